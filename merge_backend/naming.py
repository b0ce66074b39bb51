"""Key names between the original single-file layout and diffusers' layout, both ways.

The mapping is data: for each component a table of prefix renames (diffusers prefix ->
original prefix, plus how the tensor changes) is generated from the diffusers config, and a
key is renamed by its longest matching prefix. The same table drives both directions, so an
original -> diffusers -> original round trip is bit-exact. Which table a component uses is its
``converter`` in the architecture file; ``CONVERTERS`` holds the table builders by name.

Example:
    >>> from merge_backend.architectures import ARCHITECTURES
    >>> km = key_maps(ARCHITECTURES["sd1"], "unet", ["down_blocks.1.resnets.0.norm1.weight"],
    ...               {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    ...                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    ...                "layers_per_block": 2})[0]
    >>> km.original
    'model.diffusion_model.input_blocks.4.0.in_layers.0.weight'
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from merge_backend.architectures import CLIP_MERGE_SKIPS, Architecture
from merge_backend.modules import build_module
from merge_backend.name_rules import (
    Rule,
    Table,
    flux_table,
    index_count,
    mmdit_table,
    same,
    t5_table,
)

TRANSFORMS = ("id", "reshape", "chunk", "transpose", "swap", "tied")


@dataclass(frozen=True)
class KeyMap:
    """One diffusers tensor and where it lives in the original layout.

    ``transform`` says how the diffusers tensor is made from the original one: ``id`` (same
    tensor), ``reshape`` (VAE attention 1x1 conv weight -> linear weight), ``chunk`` (part
    ``index`` of ``parts`` along dim 0, e.g. q/k/v of OpenCLIP's or an MMDiT's fused ``qkv``;
    ``sizes`` gives the parts' relative sizes when they differ, as Flux's ``linear1`` holds
    q, k, v and a 4x wider MLP input), ``transpose`` (OpenCLIP's ``text_projection``),
    ``swap`` (the two halves of dim 0 exchanged: the original AdaLayerNorm's (shift, scale)
    is diffusers' (scale, shift)) or ``tied`` (a tied copy of another key's tensor, e.g. T5's
    ``encoder.embed_tokens`` of ``shared``: read, never written back).
    """

    diffusers: str
    original: str
    transform: str = "id"
    index: int = 0
    parts: int = 1
    sizes: tuple[int, ...] = ()

    def rows(self, total: int) -> slice:
        """The rows of the original tensor (``total`` rows) that this chunk holds."""
        return part_rows(total, self.index, self.parts, self.sizes)


def part_rows(total: int, index: int, parts: int, sizes: tuple[int, ...] = ()) -> slice:
    """Rows of part ``index`` of ``parts`` along dim 0 of a tensor of ``total`` rows; ``sizes``:
    the parts' relative sizes (equal parts when empty)."""
    sizes = sizes or (1,) * parts
    unit, rest = divmod(total, sum(sizes))
    if rest:
        raise ValueError(f"{total} rows do not split into parts of relative sizes {sizes}")
    start = unit * sum(sizes[:index])
    return slice(start, start + unit * sizes[index])


def whole_rows(rows: int, index: int, parts: int, sizes: tuple[int, ...] = ()) -> int:
    """Rows of the whole tensor whose part ``index`` has ``rows`` rows (see ``part_rows``)."""
    sizes = sizes or (1,) * parts
    return rows * sum(sizes) // sizes[index]


def swap_halves(t: Tensor) -> Tensor:
    """The two halves of dim 0 exchanged (its own inverse)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."),
           ("time_emb_proj.", "emb_layers.1."), ("norm2.", "out_layers.0."),
           ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection."))
_UNET_FIXED = (("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."),
               ("conv_out.", "out.2."),
               ("time_embedding.linear_1.", "time_embed.0."),
               ("time_embedding.linear_2.", "time_embed.2."),
               ("add_embedding.linear_1.", "label_emb.0.0."),
               ("add_embedding.linear_2.", "label_emb.0.2."),
               ("class_embedding.linear_1.", "label_emb.0.0."),
               ("class_embedding.linear_2.", "label_emb.0.2."))
_VAE_FIXED = (("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("conv_norm_out.", "norm_out."))
_VAE_RESNET = (("conv_shortcut.", "nin_shortcut."), ("", ""))
_VAE_ATTENTION = (("group_norm.", "norm.", "id"),
                  ("to_q.weight", "q.weight", "reshape"), ("to_q.bias", "q.bias", "id"),
                  ("to_k.weight", "k.weight", "reshape"), ("to_k.bias", "k.bias", "id"),
                  ("to_v.weight", "v.weight", "reshape"), ("to_v.bias", "v.bias", "id"),
                  ("to_out.0.weight", "proj_out.weight", "reshape"),
                  ("to_out.0.bias", "proj_out.bias", "id"))
_OPEN_CLIP_LAYER = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."),
                    ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                    ("mlp.fc2.", "mlp.c_proj."))
_OPEN_CLIP_QKV = ("q", "k", "v")
# transformers 5 drops the 'text_model.' wrapper from CLIPTextModel (not ...WithProjection).
_HF_CLIP_WRAPPED = (("text_model.", "text_model."), ("text_projection.", "text_projection."))
_HF_CLIP_FLAT = (("embeddings.", "text_model.embeddings."), ("encoder.", "text_model.encoder."),
                 ("final_layer_norm.", "text_model.final_layer_norm."))


def _per_level(value: int | Iterable[int], levels: int) -> list[int]:
    return [value] * levels if isinstance(value, int) else list(value)


# ---------------------------------------------------------------------------- UNet


def _unet_config_from_keys(keys: list[str]) -> dict[str, Any]:
    """The few config values the UNet rules need, read off diffusers key names."""
    def types(side: str, attn: str, plain: str) -> list[str]:
        n = index_count(keys, f"{side}_blocks.")
        return [attn if any(k.startswith(f"{side}_blocks.{i}.attentions.") for k in keys)
                else plain for i in range(n)]
    has_mid_attn = any(k.startswith("mid_block.attentions.") for k in keys)
    return {"down_block_types": types("down", "CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": types("up", "CrossAttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": index_count(keys, "down_blocks.0.resnets."),
            "mid_block_type": "UNetMidBlock2DCrossAttn" if has_mid_attn else None}


def _add_resnet(table: Table, diffusers: str, original: str) -> None:
    for d, o in _RESNET:
        table[diffusers + d] = same(original + o)


def _unet_table(config: Mapping[str, Any]) -> Table:
    table: Table = {d: same(o) for d, o in _UNET_FIXED}
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    layers = _per_level(config["layers_per_block"], len(down))
    n = 1  # input_blocks.0 is conv_in
    for i, kind in enumerate(down):
        for j in range(layers[i]):
            _add_resnet(table, f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.")
            if "CrossAttn" in kind:
                table[f"down_blocks.{i}.attentions.{j}."] = same(f"input_blocks.{n}.1.")
            n += 1
        if i < len(down) - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv."] = same(f"input_blocks.{n}.0.op.")
            n += 1
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid is not None:
        if mid != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"UNet mid_block_type {mid!r} has no original-layout rule; "
                             "only UNetMidBlock2DCrossAttn (SD1/SD2/SDXL) is supported")
        _add_resnet(table, "mid_block.resnets.0.", "middle_block.0.")
        table["mid_block.attentions.0."] = same("middle_block.1.")
        _add_resnet(table, "mid_block.resnets.1.", "middle_block.2.")
    up_layers = list(reversed(layers))
    n = 0
    for i, kind in enumerate(up):
        attn = "CrossAttn" in kind
        for j in range(up_layers[i] + 1):
            _add_resnet(table, f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.")
            if attn:
                table[f"up_blocks.{i}.attentions.{j}."] = same(f"output_blocks.{n}.1.")
            n += 1
        if i < len(up) - 1:  # the upsampler follows the level's last resnet (and attention)
            upsampler = f"output_blocks.{n - 1}.{2 if attn else 1}."
            table[f"up_blocks.{i}.upsamplers.0."] = same(upsampler)
    return table


# ---------------------------------------------------------------------------- VAE


def _vae_table(keys: list[str], config: Mapping[str, Any] | None) -> Table:
    if config:
        levels, layers = len(config["down_block_types"]), config["layers_per_block"]
    else:
        levels = index_count(keys, "encoder.down_blocks.")
        layers = index_count(keys, "encoder.down_blocks.0.resnets.")
    table: Table = {p: same(p) for p in ("quant_conv.", "post_quant_conv.")}
    for side in ("encoder", "decoder"):
        for d, o in _VAE_FIXED:
            table[f"{side}.{d}"] = same(f"{side}.{o}")
        for j in range(2):
            for d, o in _VAE_RESNET:
                original = f"{side}.mid.block_{j + 1}.{o}"
                table[f"{side}.mid_block.resnets.{j}.{d}"] = same(original)
        for d, o, transform in _VAE_ATTENTION:
            rule = (f"{side}.mid.attn_1.{o}", transform, 0, 1)
            table[f"{side}.mid_block.attentions.0.{d}"] = rule
    for i in range(levels):
        # diffusers' decoder up_blocks start at the lowest resolution, the original 'up.N' at the
        # highest
        enc, dec = f"encoder.down.{i}.", f"decoder.up.{levels - 1 - i}."
        for j in range(layers + 1):
            for d, o in _VAE_RESNET:
                if j < layers:
                    table[f"encoder.down_blocks.{i}.resnets.{j}.{d}"] = same(f"{enc}block.{j}.{o}")
                table[f"decoder.up_blocks.{i}.resnets.{j}.{d}"] = same(f"{dec}block.{j}.{o}")
        table[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = same(f"{enc}downsample.conv.")
        table[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = same(f"{dec}upsample.conv.")
    return table


# ---------------------------------------------------------------------------- text encoders


def _hf_clip_table(keys: list[str]) -> Table:
    wrapped = any(k.startswith("text_model.") for k in keys)
    return {d: same(o) for d, o in (_HF_CLIP_WRAPPED if wrapped else _HF_CLIP_FLAT)}


def _open_clip_table(keys: list[str]) -> Table:
    tm = "text_model." if any(k.startswith("text_model.") for k in keys) else ""
    table: Table = {f"{tm}embeddings.token_embedding.": same("token_embedding."),
                     f"{tm}embeddings.position_embedding.weight": same("positional_embedding"),
                     f"{tm}final_layer_norm.": same("ln_final."),
                     "text_projection.weight": ("text_projection", "transpose", 0, 1)}
    for n in range(index_count(keys, f"{tm}encoder.layers.")):
        d, o = f"{tm}encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for dd, oo in _OPEN_CLIP_LAYER:
            table[d + dd] = same(o + oo)
        for index, name in enumerate(_OPEN_CLIP_QKV):
            for kind in ("weight", "bias"):
                rule = (f"{o}attn.in_proj_{kind}", "chunk", index, len(_OPEN_CLIP_QKV))
                table[f"{d}self_attn.{name}_proj.{kind}"] = rule
    return table


# ---------------------------------------------------------------------------- key maps


def _component_prefix(arch: Architecture, component: str) -> str:
    if component not in arch.components:
        raise ValueError(f"{arch.name} has no component {component!r}; "
                         f"choose one of {', '.join(arch.components)}")
    return arch.components[component].prefix


def _unet(keys: list[str], config: Any) -> Table:
    # only diffusers' dict-like configs with block types count (a transformers config is ignored)
    usable = isinstance(config, Mapping) and "down_block_types" in config
    return _unet_table(config if usable else _unet_config_from_keys(keys))


def _vae(keys: list[str], config: Any) -> Table:
    usable = isinstance(config, Mapping) and "down_block_types" in config
    return _vae_table(keys, config if usable else None)


# Converter name (an architecture file's components.*.converter) -> its table builder, called
# with the diffusers keys and the diffusers config (or None).
CONVERTERS: dict[str, Callable[[list[str], Any], Table]] = {
    "ldm_unet": _unet,  # the LDM / SGM UNet of SD1, SD2, SDXL
    "ldm_vae": _vae,  # their AutoencoderKL
    "hf_clip": lambda keys, config: _hf_clip_table(keys),  # OpenAI CLIP in transformers' layout
    "open_clip": lambda keys, config: _open_clip_table(keys),  # OpenCLIP's own layout
    "mmdit": lambda keys, config: mmdit_table(keys),  # SD3 / SD3.5's transformer
    "flux": lambda keys, config: flux_table(keys),  # Flux.1's transformer (BFL's names)
    "t5": lambda keys, config: t5_table(keys),  # T5's encoder (transformers' names)
}
# Converters whose transformers module may drop a wrapper that the original, kohya and ComfyUI
# spell out (transformers 5's CLIPTextModel has no 'text_model.').
WRAPPERS = {"hf_clip": "text_model.", "open_clip": "text_model."}


def _table(arch: Architecture, component: str, keys: list[str], config: Any) -> Table:
    name = arch.components[component].converter
    if name is None:
        raise ValueError(f"{arch.source}: components.{component} names no converter to "
                         "diffusers' layout: this architecture merges files, but has no "
                         "pipelines, engine or LoRAs")
    if name not in CONVERTERS:
        raise ValueError(f"{arch.source}: components.{component}.converter: unknown {name!r}; "
                         f"known: {', '.join(CONVERTERS)}")
    return CONVERTERS[name](keys, config)


def _lookup(table: Table, key: str) -> tuple[str, Rule] | None:
    """The rule of the longest prefix of ``key`` (or ``key`` itself) in ``table``."""
    if key in table:
        return key, table[key]
    end = key.rfind(".", 0, len(key) - 1)
    while end >= 0:
        head = key[: end + 1]
        if head in table:
            return head, table[head]
        end = key.rfind(".", 0, end)
    return None


def key_maps(arch: Architecture, component: str, diffusers_keys: Iterable[str],
             config: Any = None) -> list[KeyMap]:
    """Map every key of a diffusers module's state_dict to its original full key.

    ``component`` names one of ``arch.components`` ("unet", "vae", "te", "te1", "te2", …).
    ``config`` is the diffusers config of the UNet / VAE (its block types and
    ``layers_per_block`` decide the original block indices); without it they are read off
    the key names. Raises ``ValueError`` naming diffusers keys no rule maps, or two keys that
    claim the same original tensor.
    """
    prefix = _component_prefix(arch, component)
    keys = list(diffusers_keys)
    table = _table(arch, component, keys, config)
    maps, unmapped, claimed = [], [], {}
    for key in keys:
        hit = _lookup(table, key)
        if hit is None:
            unmapped.append(key)
            continue
        head, (original, transform, index, parts, *sizes) = hit
        km = KeyMap(key, prefix + original + key[len(head):], transform, index, parts,
                    tuple(sizes[0]) if sizes else ())
        slot = (km.original, km.index)
        if transform == "tied":
            maps.append(km)
            continue
        if slot in claimed:
            raise ValueError(f"{arch.name} {component}: diffusers keys {claimed[slot]!r} and "
                             f"{key!r} both map to {km.original!r}")
        claimed[slot] = key
        maps.append(km)
    if unmapped:
        raise ValueError(f"{arch.name} {component}: no original-layout rule for diffusers key(s) "
                         f"{', '.join(unmapped[:5])}{' …' if len(unmapped) > 5 else ''} "
                         f"({len(unmapped)} in all); is this module the right component?")
    return maps


# ---------------------------------------------------------------------------- tensors


def convert_value(km: KeyMap, original_tensor: Tensor) -> Tensor:
    """The diffusers tensor of ``km`` made from its original tensor (a view where possible)."""
    t = original_tensor
    if km.transform == "id":
        return t
    if km.transform == "reshape":
        return t.flatten(1) if t.ndim > 2 else t
    if km.transform == "chunk":
        return t[km.rows(t.shape[0])]
    if km.transform == "transpose":
        return t.T.contiguous()
    if km.transform == "swap":
        return swap_halves(t)
    if km.transform == "tied":
        return t
    raise ValueError(f"unknown transform {km.transform!r} for {km.diffusers!r}; "
                     f"expected one of {TRANSFORMS}")


def original_value(maps: list[KeyMap], tensors: list[Tensor]) -> Tensor:
    """Inverse of ``convert_value`` for all the KeyMaps of one original key."""
    km = maps[0]
    if km.transform == "chunk":
        order = sorted(range(len(maps)), key=lambda i: maps[i].index)
        if [maps[i].index for i in order] != list(range(km.parts)):
            got = [m.diffusers for m in maps]
            raise ValueError(f"{km.original!r} needs {km.parts} chunks; got {got}")
        return torch.cat([tensors[i] for i in order], dim=0)
    t = tensors[0]
    if km.transform == "reshape":
        return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t
    if km.transform == "transpose":
        return t.T.contiguous()
    if km.transform == "swap":
        return swap_halves(t)
    return t


def canonical_original(arch: Architecture, original: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Old-layout keys renamed as CheckpointSave writes them ('…transformer.X' ->
    '…transformer.text_model.X' for SD1, per the file's ``renames``); tensors not copied."""
    return {arch.canonical_key(key): value for key, value in original.items()}


def unmapped_original_keys(arch: Architecture, component: str, original_keys: Iterable[str],
                           maps: Iterable[KeyMap]) -> list[str]:
    """Keys of ``component`` in an original file that no KeyMap reads (e.g. SD2's 24th layer)."""
    prefix = _component_prefix(arch, component)
    used = {km.original for km in maps}
    others = [p for c, p in arch.prefixes.items() if c != component and p.startswith(prefix)]
    return sorted(k for k in original_keys
                  if k.startswith(prefix) and k not in used and not k.startswith(tuple(others)))


ModuleOrConfig = Union[nn.Module, Mapping[str, Any], Iterable[str]]  # noqa: UP007 (an alias)


def _is_config(target: Any) -> bool:
    if hasattr(target, "to_dict") and not isinstance(target, Mapping):
        return True  # a transformers config object
    return isinstance(target, Mapping) and not any(isinstance(v, Tensor) for v in target.values())


def _target(arch: Architecture, component: str,
            target: ModuleOrConfig) -> tuple[list[str], dict | None]:
    """Diffusers keys and config from a live module, a config, a state dict or plain keys."""
    if isinstance(target, nn.Module):
        config = getattr(target, "config", None)
        return list(target.state_dict()), dict(config) if isinstance(config, Mapping) else None
    if _is_config(target):
        config = target.to_dict() if hasattr(target, "to_dict") else dict(target)
        with torch.device("meta"):
            module = build_module(component, config, arch=arch)
        return list(module.state_dict()), config
    return list(target), None


def to_diffusers(arch: Architecture, component: str, original: Mapping[str, Tensor],
                 module_or_config: ModuleOrConfig, *, strict: bool = True) -> dict[str, Tensor]:
    """One component of an original-layout state dict, in the layout of a diffusers module.

    ``original`` holds full keys (a whole checkpoint is fine: other components are ignored).
    ``module_or_config`` says which diffusers keys to produce: a live module (its state_dict
    keys and config), the diffusers / transformers config of that component (dict or config
    object), a diffusers state dict, or an iterable of diffusers keys. Original keys of the
    component that no diffusers key reads are reported: with ``strict`` a ``ValueError`` lists
    them (except the file's ``extra_tensors`` and ``CLIP_MERGE_SKIPS`` such as ``position_ids``),
    otherwise a warning.
    """
    original = canonical_original(arch, original)
    keys, config = _target(arch, component, module_or_config)
    maps = key_maps(arch, component, keys, config)
    missing = [km.original for km in maps if km.original not in original]
    if missing:
        raise ValueError(f"{arch.name} {component}: the checkpoint lacks {len(missing)} key(s) "
                         f"the diffusers module needs, e.g. {', '.join(missing[:3])}")
    extras = {t.key for t in arch.extra_tensors}
    leftover = [k for k in unmapped_original_keys(arch, component, original, maps)
                if k not in extras and not k.endswith(CLIP_MERGE_SKIPS)]
    if leftover:
        shown = ", ".join(leftover[:4]) + (" …" if len(leftover) > 4 else "")
        message = (f"{arch.name} {component}: {len(leftover)} original key(s) have no diffusers "
                   f"counterpart and are not loaded: {shown}")
        if strict:
            raise ValueError(message + " (pass strict=False to drop them)")
        warnings.warn(message, stacklevel=2)
    return {km.diffusers: convert_value(km, original[km.original]) for km in maps}


def to_original(arch: Architecture, component: str, diffusers_sd: Mapping[str, Tensor],
                config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """A diffusers module's state dict in the original layout (full keys, component prefix).

    Chunks are concatenated, 1x1 convs reshaped back and projections transposed back; other
    tensors are returned as they are (no copy). ``config`` as for ``key_maps``. Original keys
    with no diffusers counterpart (e.g. SD2's 24th text-encoder layer) are not produced:
    take them from the source file (see ``unmapped_original_keys``).
    """
    grouped: dict[str, tuple[list[KeyMap], list[Tensor]]] = {}
    for km in key_maps(arch, component, diffusers_sd.keys(), config):
        if km.transform == "tied":
            continue
        maps, tensors = grouped.setdefault(km.original, ([], []))
        maps.append(km)
        tensors.append(diffusers_sd[km.diffusers])
    return {key: original_value(maps, tensors) for key, (maps, tensors) in grouped.items()}
