"""Architectures as data: one file per model family, found by a registry.

Everything mergesearch knows about a model family — key prefixes and components, how a file
is recognised, the block vocabularies users merge by (ComfyUI's sliders, ModelMergeBlocks,
SuperMerger's MBW), which name converter maps the original layout to diffusers', text encoders
and tokenizers, LoRA name rules, CheckpointSave's facts, the diffusers pipeline and its tiny
and full config folders — is in ``<name>.yaml`` in this folder (README.md describes the fields).
The code elsewhere holds only mechanisms that read these files.

Architectures are read from this folder, from every folder (or single file) named in
``$MERGESEARCH_ARCHITECTURES`` (separated by ``os.pathsep``) and from every
``mergesearch.architectures`` entry point (a module whose folder holds ``*.yaml`` files, or a
path). Two files that name the same architecture are an error that names both.

Example:
    >>> arch = ARCHITECTURES["sd1"]
    >>> block_of(arch, "comfy", "model.diffusion_model.input_blocks.10.0.in_layers.0.weight")
    'input_blocks.10.'
    >>> block_of(arch, "mbw", "model.diffusion_model.out.2.weight")
    'OUT11'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

import torch
import yaml
from pydantic import ValidationError

from merge_backend.yaml_files import read_yaml, unique_keys

from ..plugins import entry_points, load_entry_point
from ._schema import SINGLE, SLIDERS, Architecture, Component, ExtraTensor, Layout, Vocabulary

__all__ = [
    "ARCHITECTURES", "Architecture", "ArchitectureFileError", "CLIP_MERGE_SKIPS", "Component",
    "ENTRY_POINT_GROUP", "ENV_VAR", "Layout", "SINGLE", "SLIDERS", "UnsupportedModelError", "Vocabulary",
    "architecture_folders", "block_names", "block_of", "canonical_key", "component_of",
    "convert_ratios", "detect_architecture", "detect_layout", "extra_tensor_value", "load_architecture",
    "predict_key", "report_block", "text_encoder_block",
]

ENV_VAR = "MERGESEARCH_ARCHITECTURES"
ENTRY_POINT_GROUP = "mergesearch.architectures"
BUILTIN = Path(__file__).parent
# ComfyUI's CLIPMerge* nodes leave these text-encoder keys alone, whatever the architecture.
CLIP_MERGE_SKIPS = ("position_ids", "logit_scale")
_Loader = unique_keys(getattr(yaml, "CSafeLoader", yaml.SafeLoader))


class UnsupportedModelError(ValueError):
    """The file is not a checkpoint of any known architecture in a known single-file layout."""


class ArchitectureFileError(ValueError):
    """An architecture file that cannot be used; the message names the file and the field."""


# ---------------------------------------------------------------------------- loading


def load_architecture(path: str | Path) -> Architecture:
    """Read and check one architecture file."""
    path = Path(path)
    data = read_yaml(path, ArchitectureFileError, _Loader)
    if not isinstance(data, dict):
        raise ArchitectureFileError(f"{path}: not a mapping of fields")
    try:
        return Architecture.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ArchitectureFileError(f"{path}: {where}: {first['msg']}{more}") from None


def _entry_point_folders() -> list[Path]:
    folders = []
    for name in entry_points(ENTRY_POINT_GROUP):
        target = load_entry_point(ENTRY_POINT_GROUP, name)
        if isinstance(target, ModuleType):
            folders.append(Path(target.__file__).parent)
        else:
            folders.append(Path(target))
    return folders


def architecture_folders() -> list[Path]:
    """Where architecture files are read from, in order (built-in first): folders, or files."""
    extra = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [BUILTIN, *extra, *_entry_point_folders()]


class _Registry(Mapping[str, Architecture]):
    """Name -> Architecture, read on first use (and again when $MERGESEARCH_ARCHITECTURES
    changes)."""

    def __init__(self) -> None:
        self._archs: dict[str, Architecture] | None = None
        self._env: str | None = None

    def _load(self) -> dict[str, Architecture]:
        env = os.environ.get(ENV_VAR, "")
        if self._archs is None or env != self._env:
            archs: dict[str, Architecture] = {}
            for folder in architecture_folders():
                if not folder.exists():
                    raise ArchitectureFileError(f"{folder}: no such architecture folder or file "
                                                f"(named in ${ENV_VAR} or an entry point)")
                # a folder's *.yaml files, or one file named on its own
                for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else [folder]:
                    arch = load_architecture(path)
                    if arch.name in archs:
                        raise ArchitectureFileError(
                            f"{path}: architecture {arch.name!r} is already defined by "
                            f"{archs[arch.name].source}; give it another name")
                    archs[arch.name] = arch
            self._archs, self._env = archs, env
        return self._archs

    def __getitem__(self, name: str) -> Architecture:
        archs = self._load()
        if name not in archs:
            raise KeyError(f"unknown architecture {name!r}; known: {', '.join(archs)}")
        return archs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()


ARCHITECTURES: Mapping[str, Architecture] = _Registry()


# ---------------------------------------------------------------------------- detection

# What other files look like, for "not supported: looks like <X>" messages. First match wins.
_LOOKALIKES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "a kohya LoRA (use `mergesearch lora`)"),
    ("lora_te_", "a kohya LoRA (use `mergesearch lora`)"),
    (".lora_up.weight", "a LoRA"),
    (".lora_A.weight", "a PEFT / diffusers LoRA"),
    ("double_blocks.", "a Flux transformer in a layout not described"),
    ("joint_blocks.", "a Stable Diffusion 3 MMDiT in a layout not described"),
    ("down_blocks.0.resnets.0.conv1.weight", "a diffusers UNet (pass the pipeline folder instead)"),
    ("encoder.down.0.block.0.conv1.weight", "a standalone VAE"),
    ("text_model.encoder.layers.0.", "a standalone CLIP text encoder"),
    ("model.diffusion_model.input_blocks.", "an SD-family UNet without a text encoder"),
)


def detect_architecture(keys: Iterable[str], source: str = "checkpoint") -> Architecture:
    """The architecture whose detection rules a file's key names satisfy.

    Raises ``UnsupportedModelError`` naming ``source`` and what the file looks like instead, or
    the architectures that tie when two match equally.
    """
    return detect_layout(keys, source)[0]


def detect_layout(keys: Iterable[str], source: str = "checkpoint"
                  ) -> tuple[Architecture, Layout | None]:
    """The architecture a file's key names satisfy, and the other ``layouts`` entry it is
    stored in (None: the architecture's own, CheckpointSave's, layout). See
    ``detect_architecture``."""
    keys = list(keys)
    keyset = set(keys)
    found = [(a, None) for a in ARCHITECTURES.values() if a.detect.matches(keys, keyset)]
    found += [(a, lay) for a in ARCHITECTURES.values() for lay in a.layouts
              if lay.detect.matches(keys, keyset)]
    if found:
        top = max((lay or a).detect.priority for a, lay in found)
        best = [(a, lay) for a, lay in found if (lay or a).detect.priority == top]
        if len(best) == 1:
            return best[0]
        raise UnsupportedModelError(
            f"{source}: matches several architectures equally "
            f"({', '.join(a.name + (f' ({lay.name})' if lay else '') for a, lay in best)}: "
            f"{', '.join(a.source for a, _ in best)}); give one a higher detect.priority")
    looks = next((what for marker, what in _LOOKALIKES if any(marker in k for k in keys)), None)
    if looks is None:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        looks = f"an unknown model (first keys: {sample})"
    titles = ", ".join(a.title for a in ARCHITECTURES.values())
    raise UnsupportedModelError(
        f"{source}: not supported: looks like {looks}. mergesearch merges single-file "
        f"checkpoints of {titles} (see `mergesearch architectures`).")


# ---------------------------------------------------------------------------- keys and blocks
# Functional spellings of the Architecture methods, as the rest of the code calls them.


def canonical_key(arch: Architecture, key: str) -> str:
    """The key as CheckpointSave writes it (older spellings renamed, per ``renames``)."""
    return arch.canonical_key(key)


def component_of(arch: Architecture, key: str) -> str | None:
    """The component a key belongs to ('unet', 'te', 'te1', 'vae', …) or None."""
    return arch.component_of(key)


def block_names(arch: Architecture, vocabulary: str) -> tuple[str, ...]:
    """The block names of a vocabulary, in the order ComfyUI / SuperMerger list them.

    ``single`` (ModelMergeSimple's ``all``) exists for every architecture; the others are the
    file's ``vocabularies``. A ``text_encoders`` block (MBW's BASE) comes first.
    """
    return arch.block_names(vocabulary)


def block_of(arch: Architecture, vocabulary: str, key: str) -> str:
    """The block of ``vocabulary`` that owns a diffusion key (full key, with its prefix)."""
    return arch.block_of(vocabulary, key)


def vocabulary_of(arch: Architecture, names, first: str) -> str | None:
    """The vocabulary every one of ``names`` belongs to: ``first`` if it holds them all (or
    there are none), else the first of the file's ``vocabularies`` that does; None if none."""
    for vocabulary in dict.fromkeys((first, *arch.vocabularies)):
        if all(n in block_names(arch, vocabulary) for n in names):
            return vocabulary
    return None


def text_encoder_block(arch: Architecture, vocabulary: str) -> str | None:
    """The block of ``vocabulary`` that holds the text encoders' ratio (MBW's BASE), or None."""
    return arch.vocabulary(vocabulary).text_encoders


def report_block(arch: Architecture, key: str) -> str:
    """The block a per-block report lists ``key`` under: the ``report_vocabulary`` block of a
    diffusion key; the text-encoder block (or the component's name) for a text-encoder key."""
    vocabulary = arch.report_vocabulary
    if key.startswith(arch.diffusion.prefix):
        return arch.block_of(vocabulary, key)
    return text_encoder_block(arch, vocabulary) or (arch.component_of(key) or "other")


def convert_ratios(arch: Architecture, ratios: Mapping[str, float], source: str, target: str
                   ) -> tuple[dict[str, float], list[tuple[str, dict[str, float], float]]]:
    """Diffusion ratios of vocabulary ``source`` in vocabulary ``target`` (its text-encoder
    block left out), through ComfyUI's sliders: a target block takes the ratio its sliders get.

    Returns the ratios and the conflicts: ``(block, {slider: ratio}, value kept)`` for each
    target block whose sliders get different ratios (sliders the file marks ``unused`` aside);
    the value kept follows the group's ``lossy`` rule (the first slider's, or the mean).
    """
    unused = set(arch.vocabularies[SLIDERS].unused)
    vocab = arch.vocabulary(target)
    groups = {g.block: g for g in vocab.groups}
    out: dict[str, float] = {}
    conflicts = []
    for block in vocab.block_names:
        if block == vocab.text_encoders:
            continue
        sliders = arch.sliders_of(target, block)
        values = {s: ratios[arch.slider_block(source, s)] for s in sliders}
        used = {s: v for s, v in values.items() if s not in unused} or values
        first = next(iter(used.values()))
        mean = block in groups and groups[block].lossy == "mean"
        out[block] = sum(used.values()) / len(used) if mean else first
        if len(set(used.values())) > 1:
            conflicts.append((block, used, out[block]))
    return out, conflicts


# ---------------------------------------------------------------------------- non-weights


def extra_tensor_value(extra: ExtraTensor, float_dtype: torch.dtype = torch.float32
                       ) -> torch.Tensor:
    """The value of one of the file's ``extra_tensors`` (a float one in ``float_dtype``)."""
    if extra.fill == "arange":
        return torch.arange(extra.shape[-1], dtype=torch.int64).reshape(extra.shape)
    dtype = torch.int64 if extra.dtype == "int64" else float_dtype
    return torch.full(extra.shape, extra.fill, dtype=dtype)


def predict_key(arch: Architecture, keys: Iterable[str], get) -> str:
    """``modelspec.predict_key`` of a model without one in its metadata: the first of the
    file's ``predict_key.rules`` that holds (``get(key)`` reads a tensor), else the default."""
    present = set(keys)
    for rule in arch.checkpoint_save.predict_key.rules:
        if rule.key not in present:
            continue
        if rule.std_above is None or float(get(rule.key).float().std(correction=0)) > rule.std_above:
            return rule.value
    return arch.checkpoint_save.predict_key.default
