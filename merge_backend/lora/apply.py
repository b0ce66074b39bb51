"""Adding LoRAs to weights: per key (for the file merge and the engine), to a file, to a pipeline.

``lora_deltas_for_key(uses, key)`` is the one place the strengths meet the deltas: the sum over
LoRAs of ``strength(key) · delta(key)`` in float32, in the original layout of ``key``. A UNet
key's strength is ``strength · block_strengths[block]`` (blocks of the Recipe vocabulary, not
named = 1.0); a text-encoder key's is ``te_strength`` when set, else ``strength`` (times
``block_strengths['BASE']`` in the mbw vocabulary, where BASE is the text encoder).
A DoRA / OFT / BOFT / IA3 / GLoRA module's delta depends on the weight it meets (``base``:
the merged weight), and with several LoRAs each one meets the weight the ones before it left,
as ComfyUI's chain of LoraLoaders does (see ``adapters.py``).
(``merge_file.apply_to_file`` writes a checkpoint with LoRAs applied.)

Example:
    >>> uses = [LoraUse(read_lora("style.safetensors"), 0.8)]          # doctest: +SKIP
    >>> apply_to_pipeline(pipe, uses)              # probe with the LoRA  # doctest: +SKIP
    >>> apply_to_pipeline(pipe, uses, sign=-1.0)   # and without it again # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from merge_backend.architectures import ARCHITECTURES, block_names, block_of, text_encoder_block
from merge_backend.checkpoint import Checkpoint
from merge_backend.hashing import sha256_of
from merge_backend.naming import (
    convert_value,
    key_maps,
    original_value,
    swap_halves,
    whole_rows,
)
from merge_backend.recipe import Recipe

from .formats import LoraError, LoraFile, LoraModule, read_lora
from .names import Target

_SHOW = 4


@dataclass
class LoraUse:
    """A LoRA with its strengths (see the module docstring for how they combine).

    Example:
        >>> use = LoraUse(read_lora("style.safetensors"), 0.8, {"IN04": 0.0})  # doctest: +SKIP
        >>> use.strength_for("model.diffusion_model.input_blocks.4.1.proj_in.weight")  # doctest: +SKIP
        0.0
    """

    lora: LoraFile
    strength: float = 1.0
    block_strengths: Mapping[str, float] | None = None
    te_strength: float | None = None
    vocabulary: str | None = None  # the block_strengths' names (default: report_vocabulary)
    _index: dict[str, list[tuple[LoraModule, str]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.vocabulary = self.vocabulary or self.lora.arch.report_vocabulary
        names = block_names(self.lora.arch, self.vocabulary)
        unknown = [n for n in (self.block_strengths or {}) if n not in names]
        if unknown:
            raise LoraError(f"{self.lora.source}: unknown block(s) {', '.join(map(repr, unknown))} "
                            f"in the {self.vocabulary} vocabulary; valid: {', '.join(names)}")
        self._index = self.lora.by_key()

    def keys(self) -> list[str]:
        """The original keys this LoRA changes."""
        return list(self._index)

    def entries(self, key: str) -> list[tuple[LoraModule, str]]:
        return self._index.get(key, [])

    def strength_for(self, key: str) -> float:
        blocks = self.block_strengths or {}
        arch = self.lora.arch
        if key.startswith(arch.diffusion.prefix):
            block = block_of(arch, self.vocabulary, key)
            return self.strength * blocks.get(block, 1.0)
        if self.te_strength is not None:
            return self.te_strength
        te_block = text_encoder_block(arch, self.vocabulary)
        return self.strength * (blocks.get(te_block, 1.0) if te_block else 1.0)


def as_uses(loras: Sequence[LoraUse | tuple[LoraFile, float]]) -> list[LoraUse]:
    return [u if isinstance(u, LoraUse) else LoraUse(u[0], float(u[1])) for u in loras]


def uses_from_recipe(recipe: Recipe) -> list[LoraUse]:
    """Read the LoRAs a Recipe carries (checking any sha256 it records)."""
    uses = []
    for spec in recipe.loras:
        if spec.sha256 and sha256_of(spec.path) != spec.sha256:
            raise LoraError(f"{spec.path}: sha256 differs from the recipe's {spec.sha256[:12]}…; "
                            "the LoRA file changed since the recipe was made")
        lora = read_lora(spec.path, recipe.arch, partial=spec.partial)
        uses.append(LoraUse(lora, spec.strength, spec.block_strengths, spec.te_strength,
                            recipe.vocabulary))
    return uses


# ---------------------------------------------------------------------------- per key


def _natural_shape(module: LoraModule, role: str) -> tuple[int, ...]:
    """The shape a module's delta has in the original layout of its key."""
    t = module.target
    if role == "bias":
        return (t.whole(module.diff_b.numel()),)
    if module.up is not None:
        shape = (module.up.shape[0], *module.down.shape[1:])
    else:
        shape = tuple(module.diff.shape)
    if t.transpose:
        shape = tuple(reversed(shape))
    return (t.whole(shape[0]), *shape[1:])


def _view_shape(t: Target, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the module's own weight inside a stored tensor of shape ``stored``."""
    shape = list(stored)
    if t.parts > 1:
        shape[0] = len(range(stored[0])[t.rows(stored[0])])
    return tuple(reversed(shape)) if t.transpose else tuple(shape)


def _fits(module: LoraModule, role: str, stored: tuple[int, ...]) -> tuple[int, ...] | None:
    """None when the module fits a stored tensor of shape ``stored``, else its own shape."""
    if module.adapter is not None and role == "weight":
        view = _view_shape(module.target, stored)
        return None if module.adapter.fits(view) else view
    shape = _natural_shape(module, role)
    return None if _compatible(shape, stored) else shape


def _compatible(delta: tuple[int, ...], stored: tuple[int, ...]) -> bool:
    """Same shape, the same up to trailing 1s (a linear LoRA on a 1x1 conv), or a conv
    weight flattened to (out, in·kh·kw) as LyCORIS rebuilds LoHa / LoKr conv deltas."""
    if len(delta) == 2 and len(stored) > 2 and delta[0] == stored[0] \
            and delta[1] == math.prod(stored[1:]):
        return True

    def strip(s: tuple[int, ...]) -> tuple[int, ...]:
        while len(s) > 2 and s[-1] == 1:
            s = s[:-1]
        return s
    return delta == stored or strip(tuple(delta)) == strip(tuple(stored))


def _key_delta(entries: list[tuple[LoraModule, str]], device: torch.device | str | None,
               current: Tensor | None = None) -> Tensor:
    total: Tensor | None = None
    for module, role in entries:
        t = module.target
        if role == "bias":
            part = module.diff_b.to(device=device, dtype=torch.float32).reshape(-1)
        else:
            if module.adapter is not None:
                part = module.adapter.difference(t.view(current))
            else:
                part = module.delta(device)
            part = part.T if t.transpose else part
        if t.swap:
            part = swap_halves(part)
        if t.parts > 1:
            full = torch.zeros((t.whole(part.shape[0]), *part.shape[1:]), device=part.device)
            full[t.rows(full.shape[0])] = part
            part = full
        total = part if total is None else total + part.reshape(total.shape)
    return total


def needs_weight(uses: Sequence[LoraUse], key: str) -> bool:
    """Whether a LoRA changes ``key`` by a rule that depends on the weight (DoRA, OFT, …)."""
    return any(m.adapter is not None for use in uses for m, _ in use.entries(key))


def lora_deltas_for_key(uses: Sequence[LoraUse], key: str, shape: Sequence[int] | None = None,
                        *, device: torch.device | str | None = None,
                        base: Tensor | None = None) -> Tensor | None:
    """Σ strength · delta of every LoRA that changes ``key`` (float32, original layout), or None.

    ``shape`` is the stored tensor's shape: the sum is reshaped to it (a LoRA trained as a
    linear layer on a 1x1 conv) or a ``LoraError`` names the key and both shapes.
    ``base`` is the weight the LoRAs are applied to (original layout); it is needed when
    ``needs_weight``: each LoRA's weight-dependent modules meet ``base`` plus the deltas of
    the LoRAs before it.
    """
    total: Tensor | None = None
    for use in uses:
        entries = use.entries(key)
        strength = use.strength_for(key) if entries else 0.0
        if not entries or strength == 0.0:
            continue
        current = None
        if any(m.adapter is not None for m, _ in entries):
            if base is None:
                raise LoraError(f"{use.lora.source}: {key} is changed by a weight-dependent "
                                "module; its delta needs the weight it is applied to")
            current = base.to(device=device, dtype=torch.float32)
            if shape is not None:
                current = current.reshape(tuple(shape))
            if total is not None:
                current = current + total.reshape(current.shape)
        delta = _key_delta(entries, device, current)
        if shape is not None:
            if not _compatible(tuple(delta.shape), tuple(shape)):
                raise LoraError(f"{use.lora.source}: module {entries[0][0].name!r} changes {key} "
                                f"with shape {list(delta.shape)}, the checkpoint's is {list(shape)}")
            delta = delta.reshape(tuple(shape))
        total = delta * strength if total is None else total.add_(delta, alpha=strength)
    return total


def check_loras(uses: Sequence[LoraUse], checkpoint: Checkpoint) -> None:
    """Every key the LoRAs change exists in ``checkpoint`` with a fitting shape (headers only)."""
    for use in uses:
        if use.lora.arch.name != checkpoint.arch.name:
            raise LoraError(f"{use.lora.source} is a LoRA for {use.lora.arch.title}; "
                            f"{checkpoint.path} is {checkpoint.arch.title}")
        missing = [k for k in use.keys() if k not in checkpoint]
        if missing:
            raise LoraError(f"{use.lora.source}: changes {len(missing)} key(s) that {checkpoint.path} "
                            f"lacks, e.g. {', '.join(missing[:_SHOW])}")
        for key in use.keys():
            for module, role in use.entries(key):
                shape = _fits(module, role, checkpoint.shape(key))
                if shape is not None:
                    raise LoraError(
                        f"{use.lora.source}: module {module.name!r} changes {key} with shape "
                        f"{list(shape)}, {checkpoint.path} has {list(checkpoint.shape(key))} "
                        "(a LoRA for another model size?)")


# ---------------------------------------------------------------------------- to a pipeline


def _pipeline_modules(pipe, arch) -> dict[str, torch.nn.Module]:
    parts = (arch.diffusion, *arch.text_encoders)
    return {c.name: getattr(pipe, c.folder) for c in parts}


def _expected_shape(km, param: torch.Tensor) -> tuple[int, ...]:
    """The original-layout shape of the tensor a pipeline parameter comes from."""
    shape = tuple(param.shape)
    if km.transform == "transpose":
        return tuple(reversed(shape))
    if km.transform == "chunk":
        return (whole_rows(shape[0], km.index, km.parts, km.sizes), *shape[1:])
    return shape


def _bind(pipe, arch, uses: Sequence[LoraUse]) -> dict[str, list[tuple[torch.nn.Parameter, object]]]:
    """Original key -> [(parameter, KeyMap)] for every key the LoRAs change, shapes checked."""
    keys = {k for u in uses for k in u.keys()}
    bound: dict[str, list] = {}
    for component, module in _pipeline_modules(pipe, arch).items():
        params = dict(module.named_parameters())
        config = getattr(module, "config", None)
        for km in key_maps(arch, component, list(params), config):
            if km.original in keys:
                bound.setdefault(km.original, []).append((params[km.diffusers], km))
    missing = sorted(keys - set(bound))
    if missing:
        raise LoraError(f"the pipeline has no parameter for {len(missing)} key(s) the LoRAs "
                        f"change, e.g. {', '.join(missing[:_SHOW])} (a LoRA for another "
                        "architecture?)")
    for use in uses:
        for key in use.keys():
            param, km = bound[key][0]
            for module, role in use.entries(key):
                stored = _expected_shape(km, param)
                shape = _fits(module, role, stored)
                if shape is not None:
                    raise LoraError(f"{use.lora.source}: module {module.name!r} changes {key} "
                                    f"with shape {list(shape)}, the pipeline's is {list(stored)}")
    return bound


@torch.no_grad()
def apply_to_pipeline(pipe, loras: Sequence[LoraUse | tuple[LoraFile, float]], *,
                      arch: str | None = None, sign: float = 1.0) -> int:
    """Add (``sign=-1``: subtract) the LoRAs' deltas to a live pipeline's weights, in place.

    Deltas are computed in float32 on each parameter's device. No file is written and
    parameter storage is not reallocated, so the merge engine's flat buffers stay valid.
    A subtraction restores float32 weights to rounding (fp16 ones to fp16 rounding).
    Everything is checked before the first weight changes. Returns the parameters changed.
    """
    uses = as_uses(loras)
    if not uses:
        return 0
    kinds = sorted({k for u in uses for k in u.lora.kinds()})
    if sign != 1.0 and kinds:
        raise LoraError(f"{', '.join(kinds)} modules change a weight by a rule that depends on "
                        "it; subtracting their delta does not undo them (reload the weights)")
    arch_obj = ARCHITECTURES[arch] if arch else uses[0].lora.arch
    bound = _bind(pipe, arch_obj, uses)
    changed = 0
    for key, params in bound.items():
        base = None
        if needs_weight(uses, key):
            base = original_value([km for _, km in params],
                                  [p.data.float() for p, _ in params])
        delta = lora_deltas_for_key(uses, key, _expected_shape(params[0][1], params[0][0]),
                                    device=params[0][0].device, base=base)
        if delta is None:
            continue
        for param, km in params:
            update = convert_value(km, delta).reshape(param.shape)
            param.data.copy_(param.data.float().add_(update, alpha=sign))
            changed += 1
    return changed
