"""Merge methods as plain functions over tensors. They know nothing of files or keys.

Ratio convention everywhere: ComfyUI's — ``ratio`` is model1's share (1.0 = model1 unchanged).

Two arithmetics, named in the Recipe:
- ``comfy``: ComfyUI's own float32 sequence, bit-exact with ComfyUI's merge nodes: each node is
  a weight patch ``w = W1.float(); w *= a (if a != 1); w += b * W2.float() (if b != 0)``, and
  add-difference is the node chain the exported workflow builds, step for step (REFERENCE §6).
- ``fast``: the one-pass form the in-memory engine runs at memory speed: sources are first cast
  to the working dtype (the Recipe's held precision), then ``lerp`` (computed in float32,
  rounded once to that dtype). With a float32 working dtype it agrees with ``comfy`` to float32
  rounding (~1e-7 relative); with fp16 each source is rounded before the lerp, as ComfyUI
  holding the UNet in fp16 does. It agrees with itself to the bit on every device.

Example:
    >>> import torch
    >>> weighted_sum(torch.ones(2), torch.zeros(2), 0.25)
    tensor([0.2500, 0.2500])
"""

from __future__ import annotations

import torch

F32 = torch.float32


def weighted_sum(w1: torch.Tensor, w2: torch.Tensor, ratio: float, *, arithmetic: str = "comfy",
                 work_dtype: torch.dtype = F32) -> torch.Tensor:
    """ModelMergeSimple: ``ratio * w1 + (1 - ratio) * w2`` in float32."""
    if arithmetic == "fast":
        # lerp on half / bfloat16 computes in float32 and rounds once, so running it in the
        # working dtype equals the float32 lerp cast back (and is what the engine runs).
        return torch.lerp(w2.to(work_dtype), w1.to(work_dtype), ratio)
    return _comfy_patch(w1, w2, ratio, 1.0 - ratio)


def subtract(w1: torch.Tensor, w2: torch.Tensor, multiplier: float, **_) -> torch.Tensor:
    """ModelMergeSubtract: ``multiplier * w1 - multiplier * w2``."""
    return _comfy_patch(w1, w2, multiplier, -multiplier)


def add(w1: torch.Tensor, w2: torch.Tensor, **_) -> torch.Tensor:
    """ModelMergeAdd: ``w1 + w2``."""
    return _comfy_patch(w1, w2, 1.0, 1.0)


def add_difference(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, ratio: float,
                   multiplier: float, *, arithmetic: str = "comfy",
                   work_dtype: torch.dtype = F32) -> torch.Tensor:
    """Model1 plus what model2 adds to base: ``A + (1 - ratio) * multiplier * (B - C)``.

    With ratio 0 this is the classic add-difference A + m (B - C); a per-block ratio blends
    each block between A (ratio 1) and A + m (B - C) (ratio 0). ``comfy`` computes it as the
    exported workflow's nodes do, in float32 and in their order:
    ModelMergeSubtract(B, C, m) -> ModelMergeAdd(A, .) -> the ratio node (A, ., ratio), i.e.
    ``ratio*A + (1 - ratio)*(A + (m*B - m*C))`` — the same sum in another rounding order.
    """
    if arithmetic == "fast":
        a = w1.to(work_dtype)
        target = (a.float() + (w2.to(work_dtype).float() - w3.to(work_dtype).float())).to(work_dtype)
        return torch.lerp(a, target, (1.0 - ratio) * multiplier)
    difference = _comfy_patch(w2, w3, multiplier, -multiplier)  # ModelMergeSubtract(B, C, m)
    target = _comfy_patch(w1, difference, 1.0, 1.0)  # ModelMergeAdd(A, difference)
    return _comfy_patch(w1, target, ratio, 1.0 - ratio)  # the ratio node (A, target)


def _comfy_patch(w1: torch.Tensor, w2: torch.Tensor, a: float, b: float) -> torch.Tensor:
    # ComfyUI applies a merge as a weight patch on model1's weight, in float32: scaled by
    # strength_model (skipped at 1), plus strength_patch times model2's (skipped at 0).
    out = w1.to(F32, copy=True)
    if a != 1.0:
        out *= a
    if b != 0.0:
        out += b * w2.to(F32)
    return out


def apply_op(op: str, tensors: list[torch.Tensor], ratio: float, multiplier: float, *,
             arithmetic: str = "comfy", work_dtype: torch.dtype = F32) -> torch.Tensor:
    """Run the method named ``op`` on tensors ordered as the method's roles (float32 result for
    comfy arithmetic, ``work_dtype`` for fast)."""
    if op == "weighted_sum":
        return weighted_sum(tensors[0], tensors[1], ratio, arithmetic=arithmetic,
                            work_dtype=work_dtype)
    if op == "subtract":
        return subtract(tensors[0], tensors[1], multiplier)
    if op == "add":
        return add(tensors[0], tensors[1])
    if op == "add_difference":
        return add_difference(tensors[0], tensors[1], tensors[2], ratio, multiplier,
                              arithmetic=arithmetic, work_dtype=work_dtype)
    if op == "copy":
        return tensors[0]
    raise ValueError(f"unknown merge op {op!r}")
