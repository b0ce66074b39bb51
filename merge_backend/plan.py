"""Planning a merge: every output key, its operation, ratio and sources — before any tensor.

``plan_merge(recipe, sources)`` checks that the sources fit together (same architecture, the
keys the method touches present in every source — model1 included — with the same shapes and a
floating-point dtype) and returns a ``MergePlan``. Planning reads only file headers, so a bad
input fails in milliseconds, before the long work starts. The plan is what both the file merge
and the in-memory engine execute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .architectures import CLIP_MERGE_SKIPS, block_of, component_of
from .checkpoint import Checkpoint
from .recipe import ClipMerge, Recipe

_SHOW = 5


class IncompatibleSourcesError(ValueError):
    """Sources that cannot be merged; the message says exactly what differs."""


@dataclass(frozen=True)
class KeyPlan:
    """One output tensor: ``op`` over the sources' tensors under ``key``."""

    key: str
    op: str  # "copy" (from model1) or a method name (merge_backend.methods.METHODS)
    block: str | None  # the vocabulary block (UNet) or the text encoder's name
    ratio: float = 1.0
    multiplier: float = 1.0
    held: str | None = None  # the precision the key's component is held in (Recipe.held_dtype)


@dataclass
class MergePlan:
    recipe: Recipe
    keys: list[KeyPlan]
    notes: list[str] = field(default_factory=list)

    def merged(self) -> list[KeyPlan]:
        return [k for k in self.keys if k.op != "copy"]


def plan_merge(recipe: Recipe, sources: Mapping[str, Checkpoint]) -> MergePlan:
    """Plan ``recipe`` over opened ``sources`` (role -> Checkpoint). See module docstring."""
    recipe.validate()
    model1 = sources["model1"]
    _check_architectures(recipe, sources)
    arch = model1.arch
    clip = recipe.effective_clip()
    plans: list[KeyPlan] = []
    merged_keys: list[str] = []
    diffusion = arch.diffusion.name
    # CheckpointSave drops these, or writes its own value (merge_file.checkpoint_save_defaults)
    not_copied = {e.key for e in arch.extra_tensors if e.checkpoint_save in ("drop", "always")}
    for key in model1.model_keys():
        component = component_of(arch, key)
        # ComfyUI keeps the keys CLIPMerge skips (logit_scale) in float32 on every setting
        held = None if key.endswith(CLIP_MERGE_SKIPS) else recipe.held_dtype(component)
        if component == diffusion:
            block = block_of(arch, recipe.vocabulary, key)
            plans.append(KeyPlan(key, recipe.method, block, recipe.unet_ratio(block),
                                 recipe.multiplier, held))
            merged_keys.append(key)
        elif component in (te.name for te in arch.text_encoders) and _clip_merges(clip, arch, key):
            plans.append(KeyPlan(key, clip.method, component, clip.ratio, clip.multiplier, held))
            merged_keys.append(key)
        elif key in not_copied:
            continue
        else:
            plans.append(KeyPlan(key, "copy", component, held=held))
    notes = _check_keys(recipe, sources, merged_keys)
    _check_model1_complete(sources, clip)
    _check_float(recipe, sources, plans)
    return MergePlan(recipe, plans, notes)


def _clip_merges(clip: ClipMerge | None, arch, key: str) -> bool:
    return clip is not None and not key.endswith(CLIP_MERGE_SKIPS)


def _check_architectures(recipe: Recipe, sources: Mapping[str, Checkpoint]) -> None:
    model1 = sources["model1"]
    if model1.arch.name != recipe.arch:
        raise IncompatibleSourcesError(
            f"model1 {model1.path} is {model1.arch.title} but the recipe says {recipe.arch}")
    for role, ckpt in sources.items():
        if ckpt.arch.name != model1.arch.name:
            raise IncompatibleSourcesError(
                f"cannot merge {role} {ckpt.path} ({ckpt.arch.title}) with model1 {model1.path} "
                f"({model1.arch.title}): every source must be the same architecture")


def _check_keys(recipe: Recipe, sources: Mapping[str, Checkpoint], merged: list[str]) -> list[str]:
    model1 = sources["model1"]
    notes: list[str] = []
    for role, ckpt in sources.items():
        if role == "model1":
            continue
        missing = [k for k in merged if k not in ckpt]
        if missing:
            raise IncompatibleSourcesError(
                f"{role} {ckpt.path} lacks {len(missing)} key(s) that model1 {model1.path} has "
                f"and the merge needs, e.g. {', '.join(missing[:_SHOW])}")
        bad = [(k, model1.shape(k), ckpt.shape(k)) for k in merged if model1.shape(k) != ckpt.shape(k)]
        if bad:
            k, s1, s2 = bad[0]
            raise IncompatibleSourcesError(
                f"{role} {ckpt.path} differs in shape from model1 {model1.path} at {len(bad)} "
                f"key(s), e.g. {k}: model1 {list(s1)} vs {role} {list(s2)} (a different model size "
                "or variant, such as an inpainting UNet)")
    for role, ckpt in sources.items():
        ignored = len(ckpt.keys()) - len(ckpt.model_keys())
        if ignored:
            notes.append(f"{role} {ckpt.path}: {ignored} non-model key(s) (EMA, schedule) ignored")
    return notes


def _check_model1_complete(sources: Mapping[str, Checkpoint], clip: ClipMerge | None) -> None:
    """A key of a merged component (the UNet; the text encoders when they merge) that another
    source has and model1 lacks would be left out of the output without a word: refuse it."""
    model1 = sources["model1"]
    arch = model1.arch
    diffusion = arch.diffusion.name
    merged = {diffusion} | ({te.name for te in arch.text_encoders} if clip is not None else set())
    for role, ckpt in sources.items():
        if ckpt is model1:
            continue
        extra = [k for k in ckpt.model_keys() if k not in model1
                 and component_of(arch, k) in merged and (component_of(arch, k) == diffusion
                                                          or _clip_merges(clip, arch, k))]
        if extra:
            raise IncompatibleSourcesError(
                f"model1 {model1.path} lacks {len(extra)} key(s) that {role} {ckpt.path} has and "
                f"the merge combines, e.g. {', '.join(extra[:_SHOW])}; the output would miss "
                "them (is model1 damaged, or a different variant?)")


def _check_float(recipe: Recipe, sources: Mapping[str, Checkpoint], plans: list[KeyPlan]) -> None:
    """Merged keys hold floating-point weights in every source that takes part."""
    text_encoders = {te.name for te in sources["model1"].arch.text_encoders}
    for k in plans:
        if k.op == "copy":
            continue  # copied unchanged, whatever the dtype (position_ids are integers)
        roles = ("model1", "model2") if k.block in text_encoders else recipe.merge_method.roles
        for role in roles:
            dtype = sources[role].dtype(k.key)
            if not dtype.is_floating_point:
                raise IncompatibleSourcesError(
                    f"{sources[role].path}: tensor {k.key} is {str(dtype).removeprefix('torch.')}, "
                    "not floating point; a merge combines float weights (the file is damaged "
                    "or this key holds something else)")
