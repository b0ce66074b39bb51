"""A real headless Chromium for the tests: Debian's chromium driven through its chromedriver
with selenium (no browser is downloaded). Tests that need it skip, saying why, where either
binary or selenium is missing; `.ci/run` installs both."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

CHROMIUM = os.environ.get("MERGESEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MERGESEARCH_CHROMEDRIVER", "/usr/bin/chromedriver")


def missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"no chromium at {CHROMIUM} (apt-get install chromium chromium-driver; .ci/run does)"
    if not os.access(CHROMEDRIVER, os.X_OK):
        return f"no chromedriver at {CHROMEDRIVER} (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator:
    why = missing()
    if why:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mergesearch-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1400,1000",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(check: Callable[[], object], timeout: float = 60, what: str = "the page") -> object:
    """``check()``'s first truthy result, polled until ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.25)


LOADED_IMAGES = """
return Array.from(document.querySelectorAll(arguments[0])).map(
    img => [img.getAttribute('src'), img.complete && img.naturalWidth > 0, img.naturalWidth]);
"""


def loaded_images(driver, selector: str = "img") -> list[tuple[str, bool, int]]:
    """(src, loaded, natural width) of every image ``selector`` matches."""
    return [tuple(x) for x in driver.execute_script(LOADED_IMAGES, selector)]


def pixels(png: bytes):
    """A screenshot as an RGB numpy array."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype("float32")


def assert_not_blank(png: bytes, what: str, min_colours: int = 200) -> None:
    """A screenshot that shows pictures: many distinct colours and real contrast."""
    array = pixels(png)
    colours = len({tuple(p) for p in array.reshape(-1, 3)[:: max(1, array.size // 600000)]})
    assert array.std() > 20 and colours >= min_colours, \
        f"{what} looks blank: {colours} colours, std {array.std():.1f}"
