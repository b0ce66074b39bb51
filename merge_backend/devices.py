"""The device a user names (a study config's ``device:``, a command's ``--device``), checked
against this machine before any work starts.

Example:
    >>> usable_device("cpu", "--device")
    device(type='cpu')
    >>> usable_device("gpu0", "--device")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: --device 'gpu0' is not a device: use auto, cpu, cuda, cuda:N ...
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows: the
    machine a timing was taken on."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def auto_device() -> str:
    """CUDA where there is a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def usable_device(name: str | None, where: str) -> torch.device:
    """``name`` as a torch device (``auto`` or None: ``auto_device()``); a ValueError that
    starts with ``where`` (``device:``, ``--device``) when it names no device or one this machine
    lacks."""
    if name is None or name == "auto":
        return torch.device(auto_device())
    if not DEVICE.fullmatch(name):
        raise ValueError(f"{where} {name!r} is not a device: use auto, cpu, cuda, cuda:N (N a GPU "
                         "number, e.g. cuda:0) or mps")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else \
            "no CUDA GPU is visible"
        raise ValueError(f"{where} {name}, but {why}; use {where} cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{where} {name}, but this machine has {torch.cuda.device_count()} CUDA "
                         "GPU(s) (cuda:0 ...); pick one of them")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{where} mps is not available here; use {where} cpu (or auto)")
    return device
