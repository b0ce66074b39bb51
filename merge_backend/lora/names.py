"""Which weight a LoRA module name means: one name table per architecture.

LoRA files name their modules in several spellings: kohya (``lora_unet_`` + the diffusers path
for SD1/SD2, the original path for SDXL, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + the
transformers path), diffusers / PEFT (``unet.`` / ``text_encoder.`` + the diffusers path) and
ComfyUI's LoraSave (``diffusion_model.`` + the original path, ``text_encoders.clip_l.transformer.``
+ the transformers path). Those rules are each component's ``lora`` entry in the architecture
file; the table lists every spelling of every weighted module, generated from
``naming.key_maps`` over the diffusers modules built on the meta device from the full-size
configs, so nothing here matches key strings by hand.

Example:
    >>> table = name_table("sd1")
    >>> t = table.resolve("lora_unet_down_blocks_0_attentions_0_proj_in")
    >>> t.key
    'model.diffusion_model.input_blocks.1.1.proj_in.weight'
    >>> table.name(t, "kohya"), table.name(t, "comfyui")
    ('lora_unet_down_blocks_0_attentions_0_proj_in', 'diffusion_model.input_blocks.1.1.proj_in')
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from merge_backend.architectures import ARCHITECTURES, Architecture, Component
from merge_backend.modules import build_module
from merge_backend.naming import WRAPPERS, key_maps, part_rows, swap_halves, whole_rows
from merge_backend.pipeline_configs import config_files

FORMATS = ("kohya", "comfyui", "peft")


@dataclass(frozen=True)
class Target:
    """One weighted module of an architecture, where its weight lives in the original layout.

    ``key`` is the original full weight key; OpenCLIP text encoders and DiTs keep q/k/v as one
    tensor, so a module can be part ``index`` of ``parts`` (relative ``sizes`` when they differ,
    as Flux's linear1) rows of it; ``text_projection`` is stored transposed, and a ``swap``
    module's two halves are exchanged (an AdaLayerNorm's shift/scale). ``module`` is the
    diffusers / transformers path.
    ``kind``: "linear", "conv" (LoRA-able) or "other" (norms, embeddings).

    Example:
        >>> t = name_table("sdxl").resolve("lora_te2_text_model_encoder_layers_0_self_attn_k_proj")
        >>> t.key, t.index, t.parts
        ('conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight', 1, 3)
    """

    component: str
    module: str
    key: str
    bias_key: str | None = None
    index: int = 0
    parts: int = 1
    transpose: bool = False
    kind: str = "linear"
    sizes: tuple[int, ...] = ()
    swap: bool = False
    # a whole original tensor diffusers splits or reorders (an MMDiT's qkv, an AdaLayerNorm's
    # shift/scale): tools that name original paths train it; it has no diffusers name
    fused: bool = False

    def rows(self, total: int) -> slice:
        """This module's rows of its original tensor of ``total`` rows."""
        return part_rows(total, self.index, self.parts, self.sizes)

    def whole(self, rows: int) -> int:
        """The original tensor's rows when this module's part has ``rows``."""
        return whole_rows(rows, self.index, self.parts, self.sizes)

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This module's own tensor (diffusers shape) inside its original ``tensor``."""
        if self.parts > 1:
            tensor = tensor[self.rows(tensor.shape[0])]
        if self.swap:
            tensor = swap_halves(tensor)
        return tensor.T if self.transpose else tensor

    @property
    def slot(self) -> tuple[str, int, int]:
        """What identifies a module inside a LoRA: its weight key and chunk."""
        return (self.key, self.index, self.parts)

    @property
    def lora_able(self) -> bool:
        return self.kind in ("linear", "conv")


class NameTable:
    """Every spelling of every module name of one architecture -> its ``Target``.

    Example:
        >>> table = name_table("sdxl")
        >>> table.name(table.resolve("lora_unet_input_blocks_4_1_proj_in"), "comfyui")
        'diffusion_model.input_blocks.4.1.proj_in'
    """

    def __init__(self, arch: Architecture, targets: list[Target]):
        self.arch = arch
        self.targets = targets
        self._by_slot = {t.slot: t for t in targets}
        aliases: dict[str, Target] = {}
        ambiguous: set[str] = set()
        for target in targets:
            for alias in self._aliases(target):
                if alias in aliases and aliases[alias] != target:
                    ambiguous.add(alias)
                aliases[alias] = target
        self._aliases_map = {a: t for a, t in aliases.items() if a not in ambiguous}

    def resolve(self, name: str) -> Target | None:
        """The module a name from a LoRA file means, or None."""
        return self._aliases_map.get(name)

    def comfy_only(self, name: str) -> str | None:
        """Why a module name means a weight only ComfyUI's own models hold (a component's
        ``lora.comfyui_only``: LoraSave writes it, no checkpoint stores it), or None."""
        for c in self.arch.components.values():
            only = c.lora.comfyui_only
            if only is None:
                continue
            for path in only.modules:
                spelled = [rule.prefix + (path.replace(".", "_") if fmt == "kohya" else path)
                           for fmt in ("comfyui", "kohya") if (rule := c.lora.format(fmt))]
                if name in spelled:
                    return only.why
        return None

    def by_slot(self, slot: tuple[str, int, int]) -> Target | None:
        return self._by_slot.get(slot)

    def components(self, names: Iterable[str]) -> Iterator[Target]:
        wanted = set(names)
        return (t for t in self.targets if t.component in wanted)

    # ------------------------------------------------------------------ spellings
    def _component(self, target: Target) -> Component:
        return self.arch.components[target.component]

    def hf_path(self, target: Target) -> str:
        """The diffusers / transformers path as kohya and ComfyUI spell it (a text encoder's
        with the 'text_model.' wrapper transformers 5 drops)."""
        if target.fused:
            return None
        wrapper = WRAPPERS.get(self._component(target).converter)
        if wrapper is None or target.module.startswith((wrapper, "text_projection")):
            return target.module
        return wrapper + target.module

    def original_path(self, target: Target) -> str | None:
        """The original module path after the component prefix (None for chunks/transposes)."""
        if (target.parts > 1 or target.transpose or target.swap
                or not target.key.endswith(".weight")):
            return None
        prefix = self._component(target).prefix
        return target.key[len(prefix):-len(".weight")]

    def name(self, target: Target, fmt: str) -> str:
        """The module name ``fmt`` ("kohya", "comfyui", "peft") writes for ``target``."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
        rule = self._component(target).lora.format(fmt)
        if rule is None:
            raise ValueError(f"{self.arch.source}: components.{target.component}.lora has no "
                             f"{fmt} names")
        path = self.original_path(target) if rule.paths == "original" else self.hf_path(target)
        if path is None:
            if target.fused:
                raise ValueError(f"{fmt} has no name for {target.key} (diffusers splits it)")
            raise ValueError(f"{fmt} has no name for {target.module} (no single original tensor)")
        return rule.prefix + (path.replace(".", "_") if fmt == "kohya" else path)

    def can_name(self, target: Target, fmt: str) -> bool:
        """Whether ``fmt`` has a name for ``target`` (kohya names no part of a fused qkv where
        it spells original paths)."""
        try:
            self.name(target, fmt)
        except ValueError:
            return False
        return True

    def _aliases(self, target: Target) -> list[str]:
        lora = self._component(target).lora
        original = self.original_path(target)
        names = [target.key[:-len(".weight")]] if original is not None else []
        if lora.bare and not target.fused:
            names.append(target.module)
        for fmt in FORMATS:
            rule = lora.format(fmt)
            if rule is None or (rule.paths == "original" and original is None):
                continue
            if target.fused and rule.paths != "original":
                continue
            names.append(self.name(target, fmt))
            if fmt == "comfyui":
                continue
            # the other path style, and the unwrapped transformers path, read too
            join = (lambda p: p.replace(".", "_")) if fmt == "kohya" else (lambda p: p)
            if not target.fused:
                names.append(rule.prefix + join(target.module))
            if original is not None and fmt == "kohya":
                names.append(rule.prefix + join(original))
        for prefix in lora.kohya_also:  # other trainers' kohya-style spellings
            names.append(prefix + target.module.replace(".", "_"))
            if original is not None:
                names.append(prefix + original.replace(".", "_"))
        return names


def _targets(arch: Architecture, component: str, module: nn.Module) -> list[Target]:
    config = getattr(module, "config", None)
    keys = list(module.state_dict().keys())
    maps = {km.diffusers: km for km in key_maps(arch, component, keys, config)}
    out = []
    for name, sub in module.named_modules():
        km = maps.get(f"{name}.weight")
        if km is None or km.transform in ("reshape", "tied"):
            continue
        kind = ("linear" if isinstance(sub, nn.Linear)
                else "conv" if isinstance(sub, nn.Conv2d) else "other")
        bias = maps.get(f"{name}.bias")
        out.append(Target(component, name, km.original, bias.original if bias else None,
                          km.index, km.parts, km.transform == "transpose", kind, km.sizes,
                          km.transform == "swap"))
    if any(rule.paths == "original" for fmt in FORMATS
           if (rule := arch.components[component].lora.format(fmt))):
        out += _fused(arch, component, out)
    return out


def _fused(arch: Architecture, component: str, parts: list[Target]) -> list[Target]:
    """Whole-tensor targets for original tensors diffusers splits into modules (an MMDiT's
    fused qkv, Flux's linear1) or reorders (the final AdaLayerNorm): the modules LoRA tools
    that name original paths train."""
    prefix = arch.components[component].prefix
    whole: dict[str, Target] = {}
    for t in parts:
        if (t.parts > 1 or t.swap) and t.key not in whole:
            path = t.key[len(prefix):-len(".weight")]
            whole[t.key] = Target(component, path, t.key, t.bias_key, kind=t.kind, fused=True)
    return list(whole.values())


@cache
def name_table(arch_name: str) -> NameTable:
    """The name table of ``arch_name`` (built once per process on the meta device, ~0.3 s).

    Built from the full-size configs; the tiny test families have the same topology with
    fewer layers, so their modules are a subset.
    """
    arch = ARCHITECTURES[arch_name]
    files = config_files(arch_name, "full")
    targets: list[Target] = []
    with torch.device("meta"):
        for c in arch.components.values():
            if not any(c.lora.format(fmt) for fmt in FORMATS):
                continue  # a component no LoRA format names (the VAE)
            module = build_module(c.name, files[f"{c.folder}/config.json"], arch=arch)
            targets += _targets(arch, c.name, module)
    return NameTable(arch, targets)


@cache
def module_shapes(arch_name: str, size: str) -> dict[tuple[str, str], tuple[int, ...]]:
    """(component, diffusers module path) -> its weight's shape, in one of the architecture's
    config folders (a LoRA's factors must fit these)."""
    arch = ARCHITECTURES[arch_name]
    files = config_files(arch_name, size)
    shapes = {}
    with torch.device("meta"):
        for c in arch.components.values():
            if not any(c.lora.format(fmt) for fmt in FORMATS):
                continue
            module = build_module(c.name, files[f"{c.folder}/config.json"], arch=arch)
            for name, sub in module.named_modules():
                weight = getattr(sub, "weight", None)
                if isinstance(weight, torch.Tensor):
                    shapes[(c.name, name)] = tuple(weight.shape)
    return shapes
