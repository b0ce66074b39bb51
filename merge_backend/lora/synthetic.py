"""Random LoRAs that fit a checkpoint: for tests, benchmarks and trying the tools without files.

Example:
    >>> lora = random_lora(open_checkpoint("base.safetensors"), rank=4)   # doctest: +SKIP
    >>> save_lora(lora, "random.safetensors")                             # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from merge_backend.checkpoint import Checkpoint

from .formats import LoraFile, LoraModule
from .names import name_table
from .svd import shaped


def random_lora(checkpoint: Checkpoint, rank: int = 4, *, seed: int = 0,
                components: Sequence[str] | None = None, alpha: float | None = None,
                vary_alpha: bool = False, scale: float = 0.05, every: int = 1) -> LoraFile:
    """A LoRA on every ``every``-th LoRA-able module of ``components`` (default: the diffusion
    model) in ``checkpoint``.

    ``alpha=None`` stores no alpha (= rank); ``vary_alpha`` gives modules different alphas.
    Each delta's RMS is about ``scale`` (with alpha = rank).
    """
    table = name_table(checkpoint.arch.name)
    components = components or (checkpoint.arch.diffusion.name,)
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    targets = [t for t in table.components(components) if t.lora_able and t.key in checkpoint
               and table.can_name(t, "kohya")]
    for i, target in enumerate(targets[::every]):
        shape = list(checkpoint.shape(target.key))
        rows = target.rows(shape[0])
        shape[0] = rows.stop - rows.start
        if target.transpose:
            shape.reverse()
        out, inner = shape[0], math.prod(shape[1:])
        r = min(rank, out, inner)
        std = math.sqrt(scale / math.sqrt(r))
        up = torch.randn(out, r, generator=gen) * std
        down = torch.randn(r, inner, generator=gen) * std
        up, down = shaped(up, down, tuple(shape))
        a = alpha
        if vary_alpha:
            a = float(r * (1 + i % 3) / 2)
        modules[target.slot] = LoraModule(target, up, down, a, name=table.name(target, "kohya"))
    return LoraFile(checkpoint.arch, modules, None, "kohya", {})
