"""Shared fixtures: the tiny SD1 / SD2 / SDXL / SD3.5 / Flux families, written once per session; gpu / slow
markers; caches in the session's temporary folder."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # any hub call fails at once instead of hanging
# Tiny models gain nothing from a second thread, and two OpenMP threads per process collapse
# when the cores are shared (pytest-xdist runs one worker per core instead).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from merge_backend.tiny import TinyFamily, write_tiny_family  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped where there is none)")
    config.addinivalue_line("markers", "slow: longer end-to-end tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def hash_cache(tmp_path_factory: pytest.TempPathFactory):
    """The sha256 cache lives in the session's temporary folder, never in the user's home."""
    from merge_backend.hashing import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("cache") / "sha256.json")
    return os.environ[CACHE_ENV]


@pytest.fixture(scope="session", autouse=True)
def config_cache(tmp_path_factory: pytest.TempPathFactory):
    """diffusers config folders are written under the session's temporary folder too."""
    from merge_backend.pipeline_configs import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("mergesearch-cache"))
    return os.environ[CACHE_ENV]


def _tiny_family_fixture(arch: str):
    """A session fixture ``tiny_<arch>``: the architecture's tiny family, written once."""
    @pytest.fixture(scope="session", name=f"tiny_{arch}")
    def family(tmp_path_factory: pytest.TempPathFactory) -> TinyFamily:
        return write_tiny_family(tmp_path_factory.mktemp(f"tiny_{arch}"), arch, seed=0)
    return family


# tiny_sd1, tiny_sd2, tiny_sdxl, tiny_sd35_large, tiny_sd35_medium, tiny_flux1
for _arch in ("sd1", "sd2", "sdxl", "sd35_large", "sd35_medium", "flux1"):
    globals()[f"tiny_{_arch}"] = _tiny_family_fixture(_arch)


from browser import browser  # noqa: E402, F401 - the headless Chromium fixture (tests/browser.py)
from postgres_server import postgres_url  # noqa: E402, F401 - a PostgreSQL server fixture
