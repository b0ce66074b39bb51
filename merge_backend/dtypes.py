"""Model dtypes by name, and what holding weights in one of them does to a value.

ComfyUI holds each model in one precision while it merges (its defaults: the UNet in float32
on the CPU and in fp16 on most GPUs, the text encoders in fp16 everywhere; ``--fp32-unet``,
``--fp16-unet``, ``--fp32-text-enc`` … change them): a source is rounded to that precision when
it is loaded, every merge and LoRA patch is computed from those values in float32, and the
result is rounded to that precision once. A Recipe names the precision of the UNet and of the
text encoders (``unet_dtype``, ``text_encoder_dtype``); ``held`` is the rounding.

Example:
    >>> import torch
    >>> held(torch.tensor([1.0001]), torch.float16).item()
    1.0
    >>> held(torch.tensor([1.0001]), torch.float32).item() == torch.tensor([1.0001]).item()
    True
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16,
                                  "fp32": torch.float32}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def held(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` as a model held in ``dtype`` holds it: rounded once to ``dtype``.

    float32 holds fp16 / bf16 / float32 values exactly, so they come back unchanged (not
    copied); integers and ``dtype=None`` (a component merged without a held precision, the VAE)
    are left alone.
    """
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    if dtype == torch.float32 and tensor.dtype.itemsize <= 4:
        return tensor
    return tensor.to(dtype)


def rounds_to(dtype: torch.dtype | None, result: torch.dtype) -> bool:
    """True when a float32 result must be rounded to ``dtype`` before it is stored as
    ``result`` (storing in ``dtype`` itself, or in float32, needs no extra step)."""
    return dtype is not None and dtype not in (result, torch.float32)
