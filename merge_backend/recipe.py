"""The Recipe: the one plain-data description of a merge that passes between the wings.

A Recipe names its sources, the merge method, the block vocabulary and every block's ratio,
in ComfyUI's convention (ratio = model1's share; 1.0 = model1 unchanged). It is JSON-able,
carries no tensors and knows nothing about Optuna or scorers.

Example:
    >>> r = Recipe(arch="sd1", method="weighted_sum", vocabulary="blocks",
    ...            ratios={"input": 1.0, "middle": 0.5, "out": 0.0},
    ...            models={"model1": Source("a.safetensors"), "model2": Source("b.safetensors")})
    >>> r.validate()
    >>> Recipe.from_json(r.to_json()) == r
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .architectures import ARCHITECTURES, block_names, text_encoder_block
from .dtypes import DTYPES
from .methods import METHODS, MergeMethod, clip_methods

ARITHMETICS = ("comfy", "fast")


class RecipeError(ValueError):
    """A Recipe that cannot be built; the message names the field and the fix."""


@dataclass(frozen=True)
class Source:
    """A checkpoint the Recipe reads; sha256 is filled in when the merge or study starts."""

    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class ClipMerge:
    """How the text encoders merge (CLIPMergeSimple / Subtract / Add). None in a Recipe = model1's."""

    method: str = "weighted_sum"
    ratio: float = 1.0
    multiplier: float = 1.0


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA added on top of the merge: delta * strength (* a per-block strength, if given).

    ``block_strengths`` uses the Recipe's vocabulary; blocks not named take 1.0. Text-encoder
    modules of the LoRA take ``te_strength`` when set, else ``strength`` (times
    ``block_strengths['BASE']`` in the mbw vocabulary, where BASE is the text encoder; a
    BASE other than 1 with ``te_strength`` is refused, as one of the two would be ignored).
    """

    path: str
    strength: float = 1.0
    block_strengths: dict[str, float] | None = None
    te_strength: float | None = None
    sha256: str | None = None
    # apply what can be read and skip (naming them) keys of formats mergesearch cannot apply
    partial: bool = False


@dataclass(frozen=True)
class Recipe:
    """A complete, JSON-able description of one merge. See the module docstring."""

    arch: str
    method: str
    models: dict[str, Source]
    vocabulary: str = "single"
    ratios: dict[str, float] = field(default_factory=dict)
    multiplier: float = 1.0
    clip: ClipMerge | None = None
    arithmetic: str = "comfy"
    allow_extrapolation: bool = False
    loras: tuple[LoraSpec, ...] = ()
    # The precision each part is held in while merging, as ComfyUI holds its models (see
    # merge_backend.dtypes): sources rounded to it, the merge computed from those values, the
    # result rounded to it before the output dtype. ComfyUI's defaults: the UNet in fp32 on the
    # CPU (fp16 on most GPUs), the text encoders in fp16; "fp32" keeps every source value.
    unet_dtype: str = "fp32"
    text_encoder_dtype: str = "fp32"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        out = asdict(self)
        for spec in out["loras"]:  # recipes without partial LoRAs keep their JSON (and hashes)
            if not spec["partial"]:
                del spec["partial"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """A Recipe from its plain data; RecipeError names the field that does not fit."""
        def mapping(value: Any, where: str) -> dict:
            if not isinstance(value, dict):
                raise RecipeError(f"not a mergesearch Recipe: {where}: expected an object, got "
                                  f"{type(value).__name__}")
            return value

        data = dict(mapping(data, "recipe"))
        try:
            data["models"] = {role: Source(**mapping(src, f"recipe.models.{role}"))
                              for role, src in mapping(data["models"], "recipe.models").items()}
            if data.get("clip") is not None:
                data["clip"] = ClipMerge(**mapping(data["clip"], "recipe.clip"))
            ratios = mapping(data.get("ratios", {}), "recipe.ratios")
            for name, value in ratios.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise RecipeError(f"not a mergesearch Recipe: recipe.ratios[{name!r}]: "
                                      f"{value!r} is not a number")
            data["ratios"] = {k: float(v) for k, v in ratios.items()}
            loras = data.get("loras", ())
            if not isinstance(loras, (list, tuple)):
                raise RecipeError(f"not a mergesearch Recipe: recipe.loras: expected a list, "
                                  f"got {type(loras).__name__}")
            data["loras"] = tuple(LoraSpec(**mapping(spec, f"recipe.loras[{i}]"))
                                  for i, spec in enumerate(loras))
            return cls(**data)
        except KeyError as exc:
            raise RecipeError(f"not a mergesearch Recipe: no {exc} field") from None
        except TypeError as exc:  # a field the dataclass does not have, or lacks
            raise RecipeError(f"not a mergesearch Recipe: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)

    def with_sources_in(self, folders: Sequence[str | Path]) -> Recipe:
        """This Recipe with each source (checkpoint or LoRA) that is not at its recorded path
        taken from the first of ``folders`` holding a file of its name: a run folder or Recipe
        used where the models live elsewhere. Whether it is the same file is for its recorded
        sha256 to say, where the sources are checked."""
        def found(path: str) -> str:
            if os.path.exists(path):
                return path
            for folder in folders:
                candidate = Path(folder) / Path(path).name
                if candidate.is_file():
                    return str(candidate.absolute())
            return path

        models = {role: dataclasses.replace(src, path=found(src.path))
                  for role, src in self.models.items()}
        loras = tuple(dataclasses.replace(lora, path=found(lora.path)) for lora in self.loras)
        return self.replace(models=models, loras=loras)

    # ------------------------------------------------------------------ meaning
    @property
    def merge_method(self) -> MergeMethod:
        """The registered method (merge_backend.methods) the Recipe names."""
        return METHODS[self.method]

    def held_dtype(self, component: str) -> str | None:
        """The precision a component is held in: the UNet's, the text encoders', or None
        (the VAE, which no merge touches)."""
        arch = ARCHITECTURES[self.arch]
        if component == arch.diffusion.name:
            return self.unet_dtype
        if component in (te.name for te in arch.text_encoders):
            return self.text_encoder_dtype
        return None

    def unet_ratio(self, block: str) -> float:
        """The ratio of a UNet block (1.0 for methods without ratios)."""
        return self.ratios[block] if self.merge_method.uses_ratio else 1.0

    @property
    def text_encoder_block(self) -> str | None:
        """The vocabulary's block that holds the text encoders' ratio (mbw's BASE), or None."""
        return text_encoder_block(ARCHITECTURES[self.arch], self.vocabulary)

    def effective_clip(self) -> ClipMerge | None:
        """The text-encoder merge: ``clip``, or in the mbw vocabulary the BASE ratio."""
        te_block = self.text_encoder_block
        if te_block and self.merge_method.uses_ratio:
            base = self.ratios[te_block]
            return None if base == 1.0 else ClipMerge("weighted_sum", ratio=base)
        return self.clip

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field; raise RecipeError naming the field and the fix."""
        if self.arch not in ARCHITECTURES:
            raise RecipeError(f"recipe.arch: unknown architecture {self.arch!r}; "
                              f"choose one of {', '.join(ARCHITECTURES)}")
        method = _method(self.method, "recipe.method")
        if self.arithmetic not in ARITHMETICS:
            raise RecipeError(f"recipe.arithmetic: {self.arithmetic!r} is not one of {ARITHMETICS}")
        for where, value in (("unet_dtype", self.unet_dtype),
                             ("text_encoder_dtype", self.text_encoder_dtype)):
            if value not in DTYPES:
                raise RecipeError(f"recipe.{where}: {value!r} is not one of {', '.join(DTYPES)}")
        missing = [r for r in method.roles if r not in self.models]
        if missing:
            raise RecipeError(f"recipe.models: method {self.method} needs {', '.join(missing)}")
        extra = [r for r in self.models if r not in method.roles]
        if extra:
            raise RecipeError(f"recipe.models: method {self.method} takes no {', '.join(extra)}")
        check_finite("recipe.multiplier", self.multiplier)
        self._validate_ratios()
        self._validate_clip()
        self._validate_loras()
        method.check(self)

    def _validate_ratios(self) -> None:
        known = ARCHITECTURES[self.arch].vocabulary_names
        if self.vocabulary not in known:
            raise RecipeError(f"recipe.vocabulary: unknown {self.vocabulary!r}; "
                              f"choose one of {', '.join(known)}")
        if not self.merge_method.uses_ratio:
            if self.ratios:
                raise RecipeError(f"recipe.ratios: method {self.method} takes no ratios")
            return
        names = block_names(ARCHITECTURES[self.arch], self.vocabulary)
        unknown = [n for n in self.ratios if n not in names]
        if unknown:
            raise RecipeError(
                f"recipe.ratios: unknown block name(s) {', '.join(map(repr, unknown))} for the "
                f"{self.vocabulary} vocabulary of {self.arch}; valid names: {', '.join(names)}")
        absent = [n for n in names if n not in self.ratios]
        if absent:
            raise RecipeError(f"recipe.ratios: no ratio for block(s) {', '.join(absent)}")
        for name, value in self.ratios.items():
            check_ratio(f"recipe.ratios[{name!r}]", value, self.allow_extrapolation)
        te_block = self.text_encoder_block
        if te_block and self.clip is not None:
            raise RecipeError(f"recipe.clip: the {self.vocabulary} vocabulary carries the "
                              f"text-encoder ratio in {te_block}; leave clip empty")

    def _validate_clip(self) -> None:
        if self.clip is None:
            return
        if _method(self.clip.method, "recipe.clip.method").clip_node is None:
            raise RecipeError(f"recipe.clip.method: {self.clip.method!r} has no CLIPMerge node "
                              f"(it cannot merge text encoders); choose one of "
                              f"{', '.join(clip_methods())}")
        check_ratio("recipe.clip.ratio", self.clip.ratio, self.allow_extrapolation)
        check_finite("recipe.clip.multiplier", self.clip.multiplier)

    def _validate_loras(self) -> None:
        names = block_names(ARCHITECTURES[self.arch], self.vocabulary)
        for i, lora in enumerate(self.loras):
            for value, where in ((lora.strength, "strength"), (lora.te_strength or 0.0, "te_strength"),
                                 *((v, f"block_strengths[{n!r}]")
                                   for n, v in (lora.block_strengths or {}).items())):
                check_finite(f"recipe.loras[{i}].{where}", value)
            unknown = [n for n in (lora.block_strengths or {}) if n not in names]
            if unknown:
                raise RecipeError(f"recipe.loras[{i}].block_strengths: unknown block(s) "
                                  f"{', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
            te_block = self.text_encoder_block
            if (lora.te_strength is not None and te_block
                    and (lora.block_strengths or {}).get(te_block, 1.0) != 1.0):
                raise RecipeError(
                    f"recipe.loras[{i}]: te_strength (--te-strength) and "
                    f"block_strengths[{te_block!r}] (--block-strength {te_block}=...) both set "
                    f"the text encoders' strength, and te_strength would win; give one")


def _method(name: str, where: str) -> MergeMethod:
    """The registered method ``name``; RecipeError naming ``where`` when there is none."""
    if not isinstance(name, str):
        raise RecipeError(f"{where}: {name!r} is not a method name")
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(f"{where}: unknown method {name!r}; choose one of "
                          f"{', '.join(METHODS)} (or install the package that provides it)") from None
    except ValueError as exc:  # a plug-in that is installed but broken (MethodError, PluginError)
        raise RecipeError(f"{where}: {exc}") from None


def check_finite(where: str, value: float) -> None:
    """A number a merge multiplies by: NaN or inf would make every merged weight NaN or inf."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where} = {value} is not a finite number")


def check_ratio(where: str, value: float, allow_extrapolation: bool) -> None:
    """Ratios live in [0, 1] (ComfyUI's sliders) unless extrapolation is asked for explicitly."""
    check_finite(where, value)
    if not allow_extrapolation and not 0.0 <= value <= 1.0:
        raise RecipeError(f"{where} = {value} is outside [0, 1]; pass --allow-extrapolation "
                          "(allow_extrapolation: true) to extrapolate past the two models")


def uniform_ratios(arch: str, vocabulary: str, value: float) -> dict[str, float]:
    """Every block of a vocabulary at the same ratio (ComfyUI's slider default is 1.0)."""
    return {name: float(value) for name in block_names(ARCHITECTURES[arch], vocabulary)}
