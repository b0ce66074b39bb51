"""8-bit image resampling as batched tensor ops, equal to the bit to PIL's or torch's own.

The CLIP preprocessors the published scorers were made with resize 8-bit images: open_clip's
transform hands a PIL image to ``Image.resize`` (Pillow's ``Resample.c``), and transformers'
``CLIPImageProcessor`` hands a uint8 tensor on the CPU to torch's uint8 antialiased kernel. Both
are separable fixed-point filters: per output pixel, double-precision filter weights over the
input pixels in its support, normalised to sum 1, rounded to integers of a fixed precision; one
pass per axis, each rounded and clipped to 0..255 before the next. They differ in the integer
precision (Pillow: 22 bits; torch: int16 with as many bits as the largest weight allows), in
how the bicubic polynomial is written, and in the pass order. The weights are computed here the
way each library does (numpy float64, in its order of operations) and applied with int32
tensor ops on the images' own device, so a GPU batch gives the library's exact bytes.

A float resize (``F.interpolate(antialias=True)``) rounded once is not enough: on noise images
it was up to 4 levels off Pillow at 512² -> 224 and 23 levels off at 160x96 -> 224 (enlarging,
where Pillow clips the first pass to 0..255 before the second).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

FILTERS = ("bilinear", "bicubic")
STYLES = ("pil", "torch")
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
_PIL_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images (32 - 8 - 2)


@dataclass(frozen=True)
class _Taps:
    """One axis's resampling: for output i, Σ_t weight[i, t] · input[index[i, t]]."""

    index: Tensor  # [out, taps] int64, clamped into range where the weight is 0
    weight: Tensor  # [out, taps] int32 fixed-point
    bits: int  # fixed-point precision of ``weight``


def resize_uint8(images: Tensor, size: tuple[int, int], filter: str, style: str) -> Tensor:
    """``[N, C, H, W]`` integer images in 0..255 (any integer dtype, any device) → int32
    ``[N, C, *size]``, resampled as ``style`` ("pil" or "torch") does with ``filter``."""
    if filter not in FILTERS:
        raise ValueError(f"interpolation {filter!r} is not supported; use one of {FILTERS}")
    if style not in STYLES:
        raise ValueError(f"resampling style {style!r}: choose one of {STYLES}")
    height, width = images.shape[-2:]
    out_h, out_w = size
    x = images.to(torch.int32)
    horizontal, vertical = out_w != width, out_h != height
    # Pillow 13 runs the vertical pass first when it shrinks while the horizontal one grows
    # (seen against Image.resize; the tests pin it); torch always runs horizontal first.
    vertical_first = style == "pil" and out_h < height and out_w > width
    if vertical and vertical_first:
        x = _rows(x, _taps(height, out_h, filter, style, str(x.device)))
    if horizontal:  # on the transpose: gathering whole rows is ~10x faster than columns
        taps = _taps(width, out_w, filter, style, str(x.device))
        x = _rows(x.transpose(-1, -2).contiguous(), taps).transpose(-1, -2).contiguous()
    if vertical and not vertical_first:
        x = _rows(x, _taps(height, out_h, filter, style, str(x.device)))
    return x


def _rows(x: Tensor, taps: _Taps) -> Tensor:
    """Resample along dim -2 of an int32 ``[..., H, W]`` tensor."""
    shape = (*x.shape[:-2], taps.index.shape[0], x.shape[-1])
    acc = torch.full(shape, 1 << (taps.bits - 1), dtype=torch.int32, device=x.device)
    for t in range(taps.index.shape[1]):
        acc.addcmul_(x.index_select(-2, taps.index[:, t]), taps.weight[:, t, None])
    # Both libraries clip the arithmetic shift of the sum into 0..255.
    return torch.bitwise_right_shift(acc, taps.bits).clamp_(0, 255)


@lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int, filter: str, style: str, device: str) -> _Taps:
    index, weight, bits = _fixed_point_weights(in_size, out_size, filter, style)
    return _Taps(torch.from_numpy(index).to(device), torch.from_numpy(weight).to(device), bits)


def _fixed_point_weights(in_size: int, out_size: int, filter: str,
                         style: str) -> tuple[np.ndarray, np.ndarray, int]:
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT[filter] * filterscale
    n_taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(n_taps)
    used = taps[None, :] < count[:, None]
    inv = 1.0 / filterscale
    x = ((taps[None, :] + first[:, None]) - center[:, None] + 0.5) * inv
    w = np.where(used, _kernel(x, filter, style), 0.0)
    total = np.zeros(out_size)
    for t in range(n_taps):  # summed tap by tap, as the C loops do
        total = total + w[:, t]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    bits = _PIL_BITS if style == "pil" else _torch_bits(w.max())
    fixed = np.trunc(np.where(w < 0, -0.5, 0.5) + w * (1 << bits)).astype(np.int32)
    index = np.minimum(first[:, None] + taps[None, :], in_size - 1)
    return index, np.where(used, fixed, 0).astype(np.int32), bits


def _torch_bits(largest: float) -> int:
    # torch picks the most bits for which the largest weight still fits an int16.
    bits = 0
    while bits < 22 and int(0.5 + largest * (1 << (bits + 1))) < (1 << 15):
        bits += 1
    return bits


def _kernel(x: np.ndarray, filter: str, style: str) -> np.ndarray:
    x = np.abs(x)
    if filter == "bilinear":
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Keys' cubic, as both libraries use for antialiased bicubic
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if style == "pil":
        outer = (((x - 5) * x + 8) * x - 4) * a
    else:
        outer = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))
