"""What every training stage shares: building modules from the tiny configs, data tensors,
progress reports, quiet libraries."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def mark_used_rows(embedding: torch.nn.Embedding, rows: list[int]) -> None:
    """Zero every row of ``embedding`` but ``rows`` and mark them (``weight.used_rows``): while
    ``used_rows_only`` is on, only those rows train and the others stay zero."""
    weight = embedding.weight
    weight.used_rows = torch.tensor(rows)
    keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[weight.used_rows] = 1.0
    with torch.no_grad():
        weight.mul_(keep)


class UsedRows(torch.nn.Module):
    """Stands in for an ``nn.Embedding`` while it trains: only its used rows are a parameter
    (``table``), and every other id reads a zero row. Each row gets the same gradient, summed
    over the same positions in the same order, as the whole table's would, so an optimiser
    steps the used rows exactly as it would inside the whole table with the other rows'
    gradient zero; the rest of a 49408-row table then costs no dense gradient and no optimiser
    state (a tenth of a CLIP step, a twentieth of a UNet's: RESULTS.md, issue 14)."""

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        super().__init__()
        weight = embedding.weight
        self.rows = weight.used_rows.to(weight.device)
        self.table = torch.nn.Parameter(weight.detach()[self.rows].clone(),
                                        requires_grad=weight.requires_grad)
        index = torch.full((weight.shape[0],), len(self.rows), dtype=torch.long,
                           device=weight.device)
        index[self.rows] = torch.arange(len(self.rows), device=weight.device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("zero", weight.new_zeros(1, weight.shape[1]), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(self.index[ids], torch.cat([self.table, self.zero]))


@contextmanager
def used_rows_only(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every embedding of ``model`` with ``used_rows`` (``mark_used_rows``) is a
    ``UsedRows`` (build the optimiser inside); on leaving, the trained rows go back into it."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Embedding) and hasattr(module.weight, "used_rows"):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            stand_in = UsedRows(module)
            setattr(parent, attribute, stand_in)
            swapped.append((parent, attribute, module, stand_in))
    try:
        yield
    finally:
        for parent, attribute, module, stand_in in swapped:
            with torch.no_grad():
                module.weight[stand_in.rows] = stand_in.table
            setattr(parent, attribute, module)


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
    buffer, so every process takes the same optimiser step."""
    size = world_size()
    if size == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
