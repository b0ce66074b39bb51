"""A person's path through the real browser, as the README gives it: `mergesearch demo
--preference` (a preference study on the demo's models, the dashboard served beside it), the
candidates' probe grids in the dashboard, a choice made by clicking "Worst", the favourite
exported, the compare page and the report, each screenshotted.

Headless Debian Chromium through chromedriver (tests/browser.py); skipped where there is none.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from browser import assert_not_blank, loaded_images, missing, wait_for
from child_signals import interruptible

from search import run_folder as rf

if missing():
    pytest.skip(missing(), allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402 - only where there is a browser

CANDIDATES, TRIALS = 3, 5


class Run:
    """`mergesearch demo --preference` in FOLDER, its stderr read as it grows."""

    def __init__(self, folder: Path):
        self.run_folder = folder / "demo-preference"
        self.log = folder.parent / f"{folder.name}.log"
        with open(self.log, "w") as log, open(folder.parent / f"{folder.name}.out", "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "search.cli", "demo", "--preference", "--folder",
                 str(folder), "--trials", str(TRIALS), "--candidates", str(CANDIDATES),
                 "--port", "0"],
                stdout=out, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"},
                preexec_fn=interruptible)
        line = wait_for(lambda: re.search(r"at (http://127\.0\.0\.1:\d+/dashboard/studies/\d+)",
                                          self.text()), 240, "the run's dashboard URL")
        self.study_url = line.group(1)
        self.base = self.study_url.split("/dashboard")[0]

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def study(self) -> optuna.Study:
        return rf.RunFolder.load(self.run_folder).study()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("person") / "demo_run")
    try:
        wait_for(lambda: "waiting for your choice" in run.text(), 300,
                 f"{CANDIDATES} candidates (log: {run.text()[-2000:]})")
        yield run
    finally:
        assert run.stop() == 130  # Ctrl-C while it waits for a choice: stored, resumable


def _dashboard_images(driver, url: str, count: int) -> list[tuple[str, bool, int]]:
    """The first ``count`` artifact images on ``url``, once each has loaded."""
    driver.get(url)

    def loaded():
        images = loaded_images(driver, 'img[src*="/artifacts/"]')
        return images[:count] if len(images) >= count and all(
            ok for _, ok, _ in images[:count]) else None

    return wait_for(loaded, 60, f"{count} loaded artifact image(s) at {url}")


def test_trial_page_renders_the_labelled_probe_grid_first(served, browser):
    study = served.study()
    trial = rf.completed(study)[0]
    images = _dashboard_images(browser, f"{served.study_url}/trials?numbers={trial.number}", 2)
    probes = trial.user_attrs[rf.ARTIFACT_PROBES]
    # the probe grid is the trial's first artifact (the gallery shows the first), then the chart
    assert images[0][0].endswith(f"/{trial._trial_id}/{probes}") and images[0][2] >= 128
    assert images[1][0].endswith(trial.user_attrs[rf.ARTIFACT_RATIOS])
    element = browser.find_element(By.CSS_SELECTOR, f'img[src$="{probes}"]')
    assert_not_blank(element.screenshot_as_png, "the trial's probe grid in the dashboard")
    body = browser.find_element(By.TAG_NAME, "body").text
    assert f"mergesearch export {served.run_folder}" in body  # the note's export command


def test_a_click_on_worst_is_stored_and_the_next_candidate_is_drawn(served, browser):
    from optuna_dashboard.preferential import load_study

    browser.get(served.study_url)
    buttons = wait_for(lambda: [b for b in browser.find_elements(By.TAG_NAME, "button")
                                if b.text.strip().upper().endswith("WORST") and b.is_enabled()]
                       if len(loaded_images(browser, 'img[src*="/artifacts/"]')) >= CANDIDATES
                       else None, 60, "the candidates' Worst buttons")
    assert len(buttons) == CANDIDATES
    assert_not_blank(browser.get_screenshot_as_png(), "the preference page")
    shown = [int(n) for n in re.findall(r"Trial\s+(\d+)", browser.find_element(
        By.TAG_NAME, "body").text)][:CANDIDATES]
    buttons[1].click()
    clicked = shown[1]
    # optuna-dashboard's own reader is the oracle for what the click stored
    stored = wait_for(lambda: [(b.number, w.number) for b, w in load_study(
        study_name="demo-preference", storage=served.study()._storage).preferences], 30,
        "the choice in the storage")
    assert sorted(stored) == sorted((n, clicked) for n in shown if n != clicked)
    time.sleep(1.0)
    assert "Failed to report preference" not in browser.find_element(By.TAG_NAME, "body").text
    # the free place is filled: the worker draws the next candidate from the stored choice
    wait_for(lambda: f"{CANDIDATES + 1}/{TRIALS} complete" in served.text(), 120,
             "the next candidate")
    assert rf.best_trial(served.study()).number != clicked


def test_the_favourite_is_exported(served, tmp_path):
    study = served.study()
    favourite = rf.best_trial(study)
    out = tmp_path / "favourite.safetensors"
    proc = subprocess.run([sys.executable, "-m", "search.cli", "export", str(served.run_folder),
                           "--best", "--to", "checkpoint", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from merge_backend import recipe_from_checkpoint

    assert recipe_from_checkpoint(out) == rf.RunFolder.load(served.run_folder).portable(
        rf.trial_recipe(favourite))


def test_compare_page_and_report_render_with_pictures(served, browser, tmp_path):
    study = served.study()
    numbers = [t.number for t in rf.ranked(study)[:2]]
    page = tmp_path / "compare.html"
    proc = subprocess.run([sys.executable, "-m", "search.cli", "compare", str(served.run_folder),
                           "--trials", ",".join(map(str, numbers)), "-o", str(page),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] == [str(page)]
    report_dir = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "search.cli", "export", str(served.run_folder),
                           "--best", "--to", "report", "--top", "3", "-o", str(report_dir),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = next(report_dir.glob("*.report.html"))
    for path, pictures in ((page, len(numbers) + 3), (report, 3 + 3)):
        browser.get(path.as_uri())
        images = wait_for(lambda: loaded_images(browser), 30, f"{path.name}'s images")
        assert len(images) == pictures and all(loaded for _, loaded, _ in images), images
        assert all(src.startswith("data:image/png;base64,") for src, _, _ in images)
        assert_not_blank(browser.get_screenshot_as_png(), path.name)
        text = browser.find_element(By.TAG_NAME, "body").text
        assert all(f"trial {n}" in text for n in numbers[:1])
        assert "seed 1" not in text  # the labels are inside the pictures, not page text
