"""Architecture facts as data: what a checkpoint's keys mean.

Everything the rest of the project knows about SD1.x, SD2.x and SDXL key layouts lives in the
tables of this module: component prefixes, the block vocabularies users merge by, and the rule
that assigns a UNet key to a block. Nothing else in the project matches key strings by hand.

Example:
    >>> arch = ARCHITECTURES["sd1"]
    >>> block_of(arch, "comfy", "model.diffusion_model.input_blocks.10.0.in_layers.0.weight")
    'input_blocks.10.'
    >>> block_of(arch, "mbw", "model.diffusion_model.out.2.weight")
    'OUT11'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
VOCABULARIES = ("single", "blocks", "comfy", "mbw")
MBW_TEXT_ENCODER_BLOCK = "BASE"

# Keys a checkpoint may carry that are not model weights (CheckpointSave drops them).
NON_MODEL_KEYS = ("alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
                  "logvar", "posterior_", "sqrt_", "model_ema.", "lvlb_weights")


class UnsupportedModelError(ValueError):
    """The file is not an SD1.x / SD2.x / SDXL checkpoint in the original single-file layout."""


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of an architecture, named as the rest of the project names it."""

    name: str  # "te" for SD1/SD2, "te1"/"te2" for SDXL
    prefix: str  # the key prefix in the original single-file layout
    kind: str  # "hf_clip" (OpenAI CLIP in transformers' layout) or "open_clip"
    diffusers_folder: str  # the diffusers pipeline component it becomes


@dataclass(frozen=True)
class Architecture:
    """The facts of one model family. Look these up in ``ARCHITECTURES``."""

    name: str
    title: str
    n_input_blocks: int
    n_output_blocks: int
    text_encoders: tuple[TextEncoder, ...]
    comfy_node: str  # ComfyUI's per-layer merge node for this family
    comfy_block_dot: bool  # SD1/SD2 nodes end input/middle/output names with a dot; SDXL's do not
    modelspec_architecture: str
    # CLIPMerge* leave these text-encoder keys alone (ComfyUI's nodes skip them).
    clip_skip_suffixes: tuple[str, ...] = ("position_ids", "logit_scale")
    # Old-layout files store some keys under a shorter prefix: {old prefix: canonical prefix}.
    legacy_prefixes: tuple[tuple[str, str], ...] = ()
    # Keys CheckpointSave adds when a file lacks them: key -> (shape, dtype name, fill).
    checkpoint_save_defaults: tuple[tuple[str, str], ...] = ()

    @property
    def components(self) -> dict[str, str]:
        """Component name -> key prefix, UNet first."""
        out = {"unet": UNET_PREFIX}
        out.update({te.name: te.prefix for te in self.text_encoders})
        out["vae"] = VAE_PREFIX
        return out


ARCHITECTURES: dict[str, Architecture] = {
    "sd1": Architecture(
        name="sd1", title="Stable Diffusion 1.x", n_input_blocks=12, n_output_blocks=12,
        text_encoders=(TextEncoder("te", "cond_stage_model.transformer.", "hf_clip", "text_encoder"),),
        comfy_node="ModelMergeSD1", comfy_block_dot=True,
        modelspec_architecture="stable-diffusion-v1",
        legacy_prefixes=(("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model."),),
    ),
    "sd2": Architecture(
        name="sd2", title="Stable Diffusion 2.x", n_input_blocks=12, n_output_blocks=12,
        text_encoders=(TextEncoder("te", "cond_stage_model.model.", "open_clip", "text_encoder"),),
        comfy_node="ModelMergeSD2", comfy_block_dot=True,
        modelspec_architecture="stable-diffusion-v2-512",
    ),
    "sdxl": Architecture(
        name="sdxl", title="Stable Diffusion XL", n_input_blocks=9, n_output_blocks=9,
        text_encoders=(
            TextEncoder("te1", "conditioner.embedders.0.transformer.", "hf_clip", "text_encoder"),
            TextEncoder("te2", "conditioner.embedders.1.model.", "open_clip", "text_encoder_2"),
        ),
        comfy_node="ModelMergeSDXL", comfy_block_dot=False,
        modelspec_architecture="stable-diffusion-xl-v1-base",
        # ("position_ids" = arange(77) int64 [1, 77]; logit_scale 4.6055 as in SDXL base 1.0.)
        checkpoint_save_defaults=(
            ("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", "arange77"),
            ("conditioner.embedders.1.model.logit_scale", "sdxl_logit_scale"),
        ),
    ),
}

# What other files look like, for "not supported: looks like <X>" messages. First match wins.
_LOOKALIKES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "a kohya LoRA (use `mergesearch lora`)"),
    ("lora_te_", "a kohya LoRA (use `mergesearch lora`)"),
    (".lora_up.weight", "a LoRA"),
    (".lora_A.weight", "a PEFT / diffusers LoRA"),
    ("double_blocks.", "a Flux transformer"),
    ("joint_blocks.", "a Stable Diffusion 3 MMDiT"),
    ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 checkpoint"),
    ("down_blocks.0.resnets.0.conv1.weight", "a diffusers UNet (pass the pipeline folder instead)"),
    ("encoder.down.0.block.0.conv1.weight", "a standalone VAE"),
    ("text_model.encoder.layers.0.", "a standalone CLIP text encoder"),
    ("model.diffusion_model.input_blocks.", "an SD-family UNet without a text encoder"),
)


def detect_architecture(keys: Iterable[str], source: str = "checkpoint") -> Architecture:
    """Tell SD1.x, SD2.x and SDXL apart from a single file's key names.

    Raises ``UnsupportedModelError`` naming ``source`` and what the file looks like instead.
    """
    keys = list(keys)
    has_unet = any(k.startswith(UNET_PREFIX + "input_blocks.") for k in keys)
    if has_unet:
        for arch in ARCHITECTURES.values():
            if all(any(k.startswith(te.prefix) for k in keys) for te in arch.text_encoders):
                # SD1 and SD2 prefixes differ; SDXL's te1 prefix is unique to it.
                if arch.name == "sd1" and any(k.startswith("conditioner.") for k in keys):
                    continue
                return arch
    looks = next((what for marker, what in _LOOKALIKES if any(marker in k for k in keys)), None)
    if looks is None:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        looks = f"an unknown model (first keys: {sample})"
    raise UnsupportedModelError(
        f"{source}: not supported: looks like {looks}. mergesearch merges SD1.x, SD2.x and SDXL "
        "single-file checkpoints (UNet under 'model.diffusion_model.' plus their text encoders)."
    )


def is_model_key(key: str) -> bool:
    """True for weights CheckpointSave keeps (not schedules, EMA copies or loss weights)."""
    return not any(key.startswith(p) for p in NON_MODEL_KEYS)


def canonical_key(arch: Architecture, key: str) -> str:
    """The key as CheckpointSave writes it (old SD1 files lack 'text_model.' in the te)."""
    for old, new in arch.legacy_prefixes:
        if key.startswith(old) and not key.startswith(new):
            return new + key[len(old):]
    return key


def component_of(arch: Architecture, key: str) -> str | None:
    """'unet', 'te', 'te1', 'te2', 'vae', or None for keys outside every component."""
    for name, prefix in arch.components.items():
        if key.startswith(prefix):
            return name
    # SD1 files in the old layout have 'cond_stage_model.transformer.X' without 'text_model.';
    # they still start with the te prefix, so nothing more to do here.
    return None


# ---------------------------------------------------------------------------- vocabularies


def _comfy_names(arch: Architecture) -> tuple[str, ...]:
    dot = "." if arch.comfy_block_dot else ""
    return (
        ("time_embed.", "label_emb.")
        + tuple(f"input_blocks.{i}{dot}" for i in range(arch.n_input_blocks))
        + tuple(f"middle_block.{i}{dot}" for i in range(3))
        + tuple(f"output_blocks.{i}{dot}" for i in range(arch.n_output_blocks))
        + ("out.",)
    )


def _mbw_names(arch: Architecture) -> tuple[str, ...]:
    return (
        (MBW_TEXT_ENCODER_BLOCK,)
        + tuple(f"IN{i:02d}" for i in range(arch.n_input_blocks))
        + ("M00",)
        + tuple(f"OUT{i:02d}" for i in range(arch.n_output_blocks))
    )


@cache
def block_names(arch: Architecture, vocabulary: str) -> tuple[str, ...]:
    """The block names of a vocabulary, in the order ComfyUI / SuperMerger list them.

    - ``single``: one ratio for the whole UNet (ModelMergeSimple);
    - ``blocks``: ModelMergeBlocks' ``input``, ``middle``, ``out``;
    - ``comfy``: ModelMergeSD1 / SD2 (30 names) or ModelMergeSDXL (24 names);
    - ``mbw``: SuperMerger's BASE, IN00.., M00, OUT00.. (26 for SD1/SD2, 20 for SDXL).
      BASE holds no UNet key: it is the text encoders' ratio.
    """
    if vocabulary == "single":
        return ("all",)
    if vocabulary == "blocks":
        return ("input", "middle", "out")
    if vocabulary == "comfy":
        return _comfy_names(arch)
    if vocabulary == "mbw":
        return _mbw_names(arch)
    raise ValueError(f"unknown vocabulary {vocabulary!r}; choose one of {', '.join(VOCABULARIES)}")


_INDEXED = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")


def _comfy_block(arch: Architecture, unet_key: str, names: tuple[str, ...]) -> str:
    # ComfyUI: the longest argument name that prefixes the key wins; no match -> first argument.
    best, best_len = names[0], 0
    for name in names:
        if unet_key.startswith(name) and len(name) > best_len:
            best, best_len = name, len(name)
    return best


def _mbw_block(arch: Architecture, unet_key: str) -> str:
    m = _INDEXED.match(unet_key)
    if m:
        return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"
    if unet_key.startswith("middle_block."):
        return "M00"
    if unet_key.startswith("out."):
        return f"OUT{arch.n_output_blocks - 1:02d}"
    # time_embed / label_emb: SuperMerger and sd-meh put them in IN00; we follow them so that
    # exported SuperMerger strings mean the same thing in SuperMerger.
    return "IN00"


def block_of(arch: Architecture, vocabulary: str, key: str) -> str:
    """The block of ``vocabulary`` that owns a UNet key (full key, with 'model.diffusion_model.')."""
    if not key.startswith(UNET_PREFIX):
        raise ValueError(f"{key!r} is not a UNet key (expected prefix {UNET_PREFIX!r})")
    unet_key = key[len(UNET_PREFIX):]
    if vocabulary == "single":
        return "all"
    if vocabulary == "mbw":
        return _mbw_block(arch, unet_key)
    return _comfy_block(arch, unet_key, block_names(arch, vocabulary))

