"""Which weight a LoRA module name means: one data table per architecture.

LoRA files name their modules in several spellings: kohya (``lora_unet_`` + the diffusers path
for SD1/SD2, the original path for SDXL, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` + the
transformers path), diffusers / PEFT (``unet.`` / ``text_encoder.`` + the diffusers path) and
ComfyUI's LoraSave (``diffusion_model.`` + the original path, ``text_encoders.clip_l.transformer.``
+ the transformers path). The table lists every spelling of every weighted module of an
architecture, generated from ``naming.key_maps`` over the diffusers modules built on the meta
device from the full-size configs, so nothing here matches key strings by hand.

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

from merge_backend.architectures import ARCHITECTURES, Architecture
from merge_backend.naming import key_maps
from merge_backend.pipeline import build_module, component_folders
from merge_backend.pipeline_configs import CONFIG_FOLDERS

FORMATS = ("kohya", "comfyui", "peft")
# kohya's prefix per component; diffusers' pipeline attribute is component_folders()'s value.
KOHYA_PREFIX = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}
# ComfyUI's CLIP state-dict name of each text encoder (LoraSave writes 'text_encoders.<name>.').
COMFY_CLIP = {("sd1", "te"): "clip_l", ("sd2", "te"): "clip_h",
              ("sdxl", "te1"): "clip_l", ("sdxl", "te2"): "clip_g"}
# Modules ComfyUI's text-encoder models hold that no checkpoint stores (CheckpointSave drops
# them): CLIP-L's text_projection, an identity matrix that SD1 and SDXL conditioning never use.
# LoraSave writes a module for it (from a zero difference) and ComfyUI applies it to that
# identity, so leaving it out changes nothing ComfyUI saves or draws. Spellings: LoraSave's, kohya's.
COMFY_ONLY = {("sd1", "te"): ("text_projection",), ("sdxl", "te1"): ("text_projection",)}
COMFY_ONLY_WHY = ("ComfyUI applies it to CLIP-L's text_projection, an identity matrix no "
                  "checkpoint stores and SD1 / SDXL conditioning never uses")
# kohya names the SDXL UNet by original paths, SD1/SD2 by diffusers paths.
KOHYA_UNET_ORIGINAL = {"sd1": False, "sd2": False, "sdxl": True}


@dataclass(frozen=True)
class Target:
    """One weighted module of an architecture, where its weight lives in the original layout.

    ``key`` is the original full weight key; OpenCLIP text encoders keep q/k/v as one
    ``in_proj_weight``, so a module can be chunk ``index`` of ``parts`` rows of it, and
    ``text_projection`` is stored transposed. ``module`` is the diffusers / transformers path.
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

    @property
    def slot(self) -> tuple[str, int]:
        """What identifies a module inside a LoRA: its weight key and chunk."""
        return (self.key, self.index)

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

    def comfy_only(self, name: str) -> bool:
        """True for a module of a weight only ComfyUI's own models hold (see ``COMFY_ONLY``)."""
        for (arch, component), paths in COMFY_ONLY.items():
            if arch != self.arch.name:
                continue
            clip = COMFY_CLIP[(arch, component)]
            for path in paths:
                if name in (f"text_encoders.{clip}.transformer.{path}",
                            KOHYA_PREFIX[component] + path.replace(".", "_")):
                    return True
        return False

    def by_slot(self, slot: tuple[str, int]) -> Target | None:
        return self._by_slot.get(slot)

    def components(self, names: Iterable[str]) -> Iterator[Target]:
        wanted = set(names)
        return (t for t in self.targets if t.component in wanted)

    # ------------------------------------------------------------------ spellings
    def hf_path(self, target: Target) -> str:
        """The transformers path as kohya and ComfyUI spell it (with 'text_model.')."""
        if target.component == "unet" or target.module.startswith(("text_model.", "text_projection")):
            return target.module
        return "text_model." + target.module

    def original_path(self, target: Target) -> str | None:
        """The original module path after the component prefix (None for chunks/transposes)."""
        if target.parts > 1 or target.transpose or not target.key.endswith(".weight"):
            return None
        prefix = self.arch.components[target.component]
        return target.key[len(prefix):-len(".weight")]

    def name(self, target: Target, fmt: str) -> str:
        """The module name ``fmt`` ("kohya", "comfyui", "peft") writes for ``target``."""
        if fmt == "kohya":
            if target.component == "unet":
                use_original = KOHYA_UNET_ORIGINAL[self.arch.name]
                path = self.original_path(target) if use_original else target.module
            else:
                path = self.hf_path(target)
            return KOHYA_PREFIX[target.component] + path.replace(".", "_")
        if fmt == "comfyui":
            if target.component == "unet":
                return "diffusion_model." + self.original_path(target)
            clip = COMFY_CLIP[(self.arch.name, target.component)]
            return f"text_encoders.{clip}.transformer.{self.hf_path(target)}"
        if fmt == "peft":
            folder = component_folders(self.arch)[target.component]
            return f"{folder}.{self.hf_path(target)}"
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")

    def _aliases(self, target: Target) -> list[str]:
        names = [self.name(target, "kohya"), self.name(target, "peft")]
        kohya = KOHYA_PREFIX[target.component]
        original = self.original_path(target)
        folder = component_folders(self.arch)[target.component]
        names += [kohya + target.module.replace(".", "_"), f"{folder}.{target.module}"]
        if original is not None:
            names += [kohya + original.replace(".", "_"), target.key[:-len(".weight")]]
        if target.component == "unet":
            names.append(target.module)  # old diffusers UNet LoRAs carry no prefix
            if original is not None:
                names.append(self.name(target, "comfyui"))
        else:
            names.append(self.name(target, "comfyui"))
        return names


def _targets(arch: Architecture, component: str, module: nn.Module) -> list[Target]:
    config = dict(module.config) if component == "unet" else None
    keys = list(module.state_dict().keys())
    maps = {km.diffusers: km for km in key_maps(arch, component, keys, config)}
    out = []
    for name, sub in module.named_modules():
        km = maps.get(f"{name}.weight")
        if km is None or km.transform == "reshape":
            continue
        kind = ("linear" if isinstance(sub, nn.Linear)
                else "conv" if isinstance(sub, nn.Conv2d) else "other")
        bias = maps.get(f"{name}.bias")
        out.append(Target(component, name, km.original, bias.original if bias else None,
                          km.index, km.parts, km.transform == "transpose", kind))
    return out


@cache
def name_table(arch_name: str) -> NameTable:
    """The name table of ``arch_name`` (built once per process on the meta device, ~0.3 s).

    Built from the full-size configs; the tiny test families have the same topology with
    fewer layers, so their modules are a subset.
    """
    arch = ARCHITECTURES[arch_name]
    files = CONFIG_FOLDERS[(arch_name, "full")]
    targets: list[Target] = []
    with torch.device("meta"):
        for component, folder in component_folders(arch).items():
            if component == "vae":
                continue
            module = build_module(component, files[f"{folder}/config.json"], arch=arch)
            targets += _targets(arch, component, module)
    return NameTable(arch, targets)
