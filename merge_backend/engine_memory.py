"""How much memory the merge engine needs, where, and whether it fits — before it binds."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

MEMORY_MODES = ("auto", "device", "offload")
_GIB = 1024**3
HEADROOM = 0.9  # leave 10% of what is free for activations and the allocator


class EngineMemoryError(MemoryError):
    """The engine would not fit; the message says how much it needs and what to change."""


@dataclass(frozen=True)
class MemoryPlan:
    """The bytes a memory mode needs on the device and in host memory."""

    mode: str
    device: torch.device
    device_bytes: int
    host_bytes: int
    device_free: int
    host_free: int

    def describe(self) -> str:
        return (f"merge engine, {self.mode} mode: {self.device_bytes / _GIB:.2f} GiB on "
                f"{self.device} ({self.device_free / _GIB:.2f} GiB free), "
                f"{self.host_bytes / _GIB:.2f} GiB host memory ({self.host_free / _GIB:.2f} GiB free)")

    def fits(self) -> bool:
        if self.device.type == "cpu":
            return self.device_bytes + self.host_bytes <= HEADROOM * self.host_free
        return (self.device_bytes <= HEADROOM * self.device_free
                and self.host_bytes <= HEADROOM * self.host_free)


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free bytes on the device, free host bytes)."""
    host = psutil.virtual_memory().available
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, host
    return host, host


def plan_memory(mode: str, device: torch.device, source_bytes: int, staging_bytes: int
                ) -> MemoryPlan:
    """Plan ``mode`` ('auto' picks device, then offload): sources resident or streamed."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode {mode!r}: choose one of {', '.join(MEMORY_MODES)}")
    dev_free, host_free = free_memory(device)
    candidates = ("device", "offload") if mode == "auto" else (mode,)
    plans = []
    for m in candidates:
        if m == "device":
            plan = MemoryPlan(m, device, source_bytes, 0, dev_free, host_free)
        else:
            plan = MemoryPlan(m, device, staging_bytes, source_bytes, dev_free, host_free)
        if plan.fits():
            return plan
        plans.append(plan)
    raise EngineMemoryError(
        "the merge engine will not fit: " + "; ".join(p.describe() for p in plans)
        + ". Try memory='offload', holding the sources in fp16 (the Recipe's unet_dtype / "
        "text_encoder_dtype), or fewer merged components (keep model1's text encoders)")
