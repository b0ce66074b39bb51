"""Several LoRAs made into one: exactly (ranks concatenated) or resized to one rank by SVD.

Exact: for a module in several LoRAs, ``up = [s1·up1 | s2·up2 | …]`` and ``down = [down1; down2;
…]`` with each ``s = strength · alpha / r`` folded into its ``up``, so ``up @ down`` is the
sum of the deltas exactly; full differences (``.diff``, ``.diff_b``) add up. A module that
mixes factors with a full difference becomes one full difference (ComfyUI would otherwise
load only one of the two). Resized: every module's summed delta is factorized at ``rank``
(see ``svd.py``), and the relative error per block is reported as for an extraction.

Example:
    >>> a, b = read_lora("a.safetensors"), read_lora("b.safetensors")    # doctest: +SKIP
    >>> merged, errors = add_loras([(a, 1.0), (b, 0.5)])                 # doctest: +SKIP
    >>> save_lora(merged, "ab.safetensors")                              # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merge_backend.architectures import report_block

from .apply import LoraUse, as_uses
from .formats import LoraError, LoraFile, LoraModule
from .quality import ErrorTable
from .svd import DEFAULT_CLAMP, check_clamp, clamp_factors, factorize, shaped


def _contributions(uses: Sequence[LoraUse]) -> dict[tuple[str, int], list[tuple[float, float, LoraModule]]]:
    """slot -> [(weight strength, bias strength, module)] in the order the modules appear."""
    out: dict[tuple[str, int], list[tuple[float, float, LoraModule]]] = {}
    for use in uses:
        for slot, module in use.lora.modules.items():
            t = module.target
            bias_strength = use.strength_for(t.bias_key) if t.bias_key else 0.0
            out.setdefault(slot, []).append((use.strength_for(t.key), bias_strength, module))
    return out


def _dense(parts: list[tuple[float, float, LoraModule]]) -> Tensor | None:
    total = None
    for strength, _, module in parts:
        delta = module.delta()
        if delta is not None:
            total = delta * strength if total is None else total.add_(delta.reshape(total.shape),
                                                                     alpha=strength)
    return total


def _bias(parts: list[tuple[float, float, LoraModule]]) -> Tensor | None:
    found = [(s, m.diff_b.float()) for _, s, m in parts if m.diff_b is not None]
    if not found:
        return None
    return sum((b * s for s, b in found[1:]), found[0][1] * found[0][0])


def _concat(module: LoraModule, parts: list[tuple[float, float, LoraModule]]) -> None:
    """Exact sum of factor-only modules by concatenating ranks (scales folded into up)."""
    factored = [(s, m) for s, _, m in parts if m.up is not None]
    layouts = {(tuple(m.up.shape[2:]), tuple(m.down.shape[1:])) for _, m in factored}
    if not factored or any(m.diff is not None for _, _, m in parts) or len(layouts) > 1:
        module.diff = _dense(parts)
        return
    module.up = torch.cat([m.up.float() * (s * m.scale) for s, m in factored], dim=1)
    module.down = torch.cat([m.down.float() for _, m in factored], dim=0)


def _block(arch, key: str) -> str:
    return report_block(arch, key)


def _resize(module: LoraModule, parts, rank: int, svd: str, clamp: float | None,
            device: torch.device, table: ErrorTable, arch) -> None:
    delta = _dense(parts)
    if delta is None:
        return
    if not module.target.lora_able or delta.ndim < 2:
        module.diff = delta
        return
    delta = delta.to(device)
    mat_shape = (delta.shape[0], delta[0].numel())
    r = min(rank, *mat_shape)
    up, down = factorize(delta, r, method=svd)
    if clamp is not None:
        up, down = clamp_factors(up, down, clamp)
    module.up, module.down = (t.cpu() for t in shaped(up, down, tuple(delta.shape)))
    table.record(_block(arch, module.target.key), delta, (up @ down))


def add_loras(loras: Sequence[LoraUse | tuple[LoraFile, float]], *, rank: int | None = None,
              svd: str = "auto", clamp: float | None = DEFAULT_CLAMP,
              device: str | torch.device = "cpu"
              ) -> tuple[LoraFile, ErrorTable | None]:
    """One LoRA equal to the strength-weighted sum of ``loras`` (see module docstring).

    ``rank=None`` concatenates ranks (exact; the rank grows to the sum); a rank resizes every
    module by SVD (``clamp``: None or a quantile, as for an extraction) and returns its error
    table.
    Block strengths of a ``LoraUse`` are honoured. Every LoRA must be for one architecture.
    """
    uses = as_uses(loras)
    if not uses:
        raise LoraError("add: give at least one LoRA")
    arch = uses[0].lora.arch
    for use in uses[1:]:
        if use.lora.arch.name != arch.name:
            raise LoraError(f"{use.lora.source} is a LoRA for {use.lora.arch.title}, "
                            f"{uses[0].lora.source} for {arch.title}; add LoRAs of one architecture")
    if rank is not None and rank < 1:
        raise LoraError(f"rank must be at least 1, got {rank}")
    check_clamp(clamp, LoraError)
    table = ErrorTable() if rank is not None else None
    modules: dict[tuple[str, int], LoraModule] = {}
    for slot, parts in _contributions(uses).items():
        module = LoraModule(parts[0][2].target, name=parts[0][2].name)
        if rank is None:
            _concat(module, parts)
        else:
            _resize(module, parts, rank, svd, clamp, torch.device(device), table, arch)
        module.diff_b = _bias(parts)
        if module.up is not None or module.diff is not None or module.diff_b is not None:
            modules[slot] = module
    return LoraFile(arch, modules, None, "kohya", {}), table
