"""How well a LoRA reproduces the difference of two checkpoints, per layer and per block.

``layer_errors(lora, model1, model2)`` compares every weight a LoRA changes with
``model1 - model2`` (float32): ``||Δ - LoRA||²`` and ``||Δ||²`` per original key. It reads the
LoRA as any consumer would (a file of any format, or a ``LoraFile``), so it measures what a file
holds, fp16 rounding and clamping included. ``ErrorTable`` sums such errors per block; the
extractor fills one as it writes. Both are meant to be reused wherever extraction quality is
judged (tests, benchmarks, choosing defaults).

Example:
    >>> errors = layer_errors("diff.safetensors", "tuned.safetensors", "base.safetensors")  # doctest: +SKIP
    >>> key, (err_sq, norm_sq) = next(iter(errors.items()))                                # doctest: +SKIP
    >>> relative = (err_sq / norm_sq) ** 0.5                                               # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from merge_backend.checkpoint import Checkpoint, open_checkpoint

from .apply import LoraUse, lora_deltas_for_key
from .formats import LoraFile, read_lora


@dataclass
class ErrorTable:
    """Relative Frobenius error ||Δ - LoRA|| / ||Δ|| per block (mbw names; BASE = text encoders).

    Example:
        >>> t = ErrorTable()
        >>> t.add("IN01", err_sq=1.0, norm_sq=4.0)
        >>> t.relative("IN01"), t.overall
        (0.5, 0.5)
    """

    err_sq: dict[str, float] = field(default_factory=dict)
    norm_sq: dict[str, float] = field(default_factory=dict)
    modules: dict[str, int] = field(default_factory=dict)

    def add(self, block: str, err_sq: float, norm_sq: float) -> None:
        self.err_sq[block] = self.err_sq.get(block, 0.0) + err_sq
        self.norm_sq[block] = self.norm_sq.get(block, 0.0) + norm_sq
        self.modules[block] = self.modules.get(block, 0) + 1

    def relative(self, block: str) -> float:
        norm = self.norm_sq.get(block, 0.0)
        return math.sqrt(self.err_sq[block] / norm) if norm > 0 else 0.0

    @property
    def overall(self) -> float:
        norm = sum(self.norm_sq.values())
        return math.sqrt(sum(self.err_sq.values()) / norm) if norm > 0 else 0.0

    def rows(self) -> list[tuple[str, int, float, float]]:
        """(block, modules, relative error, ||Δ||) in the order blocks were met."""
        return [(b, self.modules[b], self.relative(b), math.sqrt(self.norm_sq[b]))
                for b in self.err_sq]

    def format(self) -> str:
        lines = [f"{'block':<8} {'modules':>7} {'|diff|':>10} {'rel.error':>10}"]
        lines += [f"{b:<8} {n:>7} {norm:>10.4g} {e:>10.3e}" for b, n, e, norm in self.rows()]
        lines.append(f"{'overall':<8} {sum(self.modules.values()):>7} "
                     f"{math.sqrt(sum(self.norm_sq.values())):>10.4g} {self.overall:>10.3e}")
        return "\n".join(lines)

    def record(self, block: str, delta: Tensor, approx: Tensor | None) -> None:
        diff = delta if approx is None else delta - approx.reshape(delta.shape)
        self.add(block, float(diff.double().pow(2).sum()), float(delta.double().pow(2).sum()))


def layer_errors(lora: LoraFile | str | Path, model1: Checkpoint | str | Path,
                 model2: Checkpoint | str | Path, *, device: str | torch.device = "cpu"
                 ) -> dict[str, tuple[float, float]]:
    """Original key -> (||Δ - LoRA||², ||Δ||²) over every key the LoRA changes, with
    Δ = model1 - model2 in float32 and the LoRA's delta at strength 1."""
    lora = lora if isinstance(lora, LoraFile) else read_lora(lora)
    m1 = model1 if isinstance(model1, Checkpoint) else open_checkpoint(model1)
    m2 = model2 if isinstance(model2, Checkpoint) else open_checkpoint(model2)
    use = LoraUse(lora)
    out = {}
    for key in use.keys():
        diff = m1.get(key).to(device=device, dtype=torch.float32) - \
            m2.get(key).to(device=device, dtype=torch.float32)
        got = lora_deltas_for_key([use], key, diff.shape, device=device)
        out[key] = (_sq(diff - got), _sq(diff))
    return out


def _sq(t: Tensor) -> float:
    return float(t.double().pow(2).sum())
