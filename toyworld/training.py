"""What every training stage shares: building modules from the tiny configs, data tensors,
progress reports, quiet libraries."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from merge_backend.architectures import ARCHITECTURES
from merge_backend.pipeline import build_module, component_folders

# report(step, total, note): called after every training step
Report = Callable[[int, int, str], None]


def build(component: str, config_folder: Path):
    """A freshly initialised module of the tiny SD1 family (under the caller's seed)."""
    arch = ARCHITECTURES["sd1"]
    sub = component_folders(arch)[component]
    config = json.loads((Path(config_folder) / sub / "config.json").read_text())
    return build_module(component, config, arch=arch)


def pictures_to_tensor(pictures: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).float().div_(255.0)


def quiet() -> None:
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def world_token_ids(layout: bool = False, looks: bool = False) -> list[int]:
    """CLIP BPE ids of every word the world uses (``layout``, ``looks``: its layout words, its
    looks' words too), plus start / end of text (what the text encoders may learn; every other
    embedding row stays zero)."""
    from open_clip.tokenizer import SimpleTokenizer

    from toyworld.world import vocabulary

    tok = SimpleTokenizer()
    ids = {tok.encoder["<start_of_text>"], tok.encoder["<end_of_text>"]}
    for word in vocabulary(layout, looks):
        ids.update(tok.encode(word))
    return sorted(ids)


# ---------------------------------------------------------------------------- data parallel


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def share(batch: int) -> int:
    """This process's part of a global batch (every process takes the same number)."""
    size = world_size()
    if batch % size:
        raise ValueError(f"batch {batch} does not split evenly over {size} processes")
    return batch // size


def average_gradients(parameters) -> None:
    """Average gradients over the processes (a no-op alone): one all-reduce of one flat
    buffer, so every process takes the same optimiser step. A parameter with ``used_rows``
    (``mask_unused_tokens``) sends only those rows: its gradient is zero elsewhere in every
    process."""
    size = world_size()
    if size == 1:
        return
    import torch.distributed as dist

    sent = []  # (gradient, its rows or None, what is sent of it)
    for p in parameters:
        if p.grad is not None:
            rows = getattr(p, "used_rows", None)
            sent.append((p.grad, rows, p.grad if rows is None else p.grad[rows]))
    flat = torch.cat([part.reshape(-1) for _, _, part in sent])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g, rows, part in sent:
        values = flat[offset:offset + part.numel()].view_as(part)
        if rows is None:
            g.copy_(values)
        else:
            g[rows] = values
        offset += part.numel()
