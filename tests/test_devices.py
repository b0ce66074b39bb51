"""The machine a timing names: ``cpu_name`` against ``lscpu``, another reader of the CPU."""

import os
import shutil
import subprocess

import pytest

from merge_backend.devices import cpu_name


def test_cpu_name_is_the_model_name_lscpu_reports():
    lscpu = shutil.which("lscpu")
    if lscpu is None:
        pytest.skip("no lscpu on this machine")
    out = subprocess.run([lscpu], capture_output=True, text=True, check=True,
                         env={**os.environ, "LC_ALL": "C"}).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines()
             if line.startswith("Model name:")]
    if not names:
        pytest.skip("lscpu names no CPU model here")
    assert cpu_name() == names[0]
