"""A tiny model family with an architecture's real topology and file layout, made from a seed.

Three original-layout single files (the diffusion model, text encoder(s), VAE; fp32) and the
tiny diffusers config folder beside them, so that every code path - detection, merging,
loading, generating, exporting - runs on a laptop CPU in well under a second per image. Any
architecture whose file has a ``tiny`` config folder and ``tiny.finetunes`` has a family.

What differs from ``base``:
- ``finetune_a`` / ``finetune_b``: every diffusion tensor under the prefixes the architecture
  file's ``tiny.finetunes`` names (strongly; for SD: ``input_blocks.`` / ``output_blocks.``)
  and every text encoder float tensor (slightly).
Everything else (the other diffusion blocks, VAE, position_ids, logit_scale) is byte-identical
to ``base``.

The files are what the original authors save: text encoders as the file stores them
(``file_module``: SD2's 24th layer and projection), the file's ``extra_tensors`` (position_ids,
logit_scale), and a base that satisfies the architecture's ``predict_key`` rule for the tiny
scheduler's prediction type (SD2's v-prediction marker), so ComfyUI would read it as such.

Example:
    >>> fam = write_tiny_family(Path("/tmp/tiny"), "sd2", seed=0)  # doctest: +SKIP
    >>> pipe = load_pipeline(fam.base, config_folder=fam.config_folder)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from merge_backend.architectures import (
    ARCHITECTURES,
    CLIP_MERGE_SKIPS,
    Architecture,
    extra_tensor_value,
)
from merge_backend.atomic_files import atomic_path
from merge_backend.naming import to_original
from merge_backend.pipeline import build_components
from merge_backend.pipeline_configs import read_json, write_config_folder

UNET_STRENGTH = 0.5  # noise std relative to each tensor's RMS
TEXT_ENCODER_STRENGTH = 0.02
_MIN_SCALE = 0.01  # zero-initialised tensors (biases) still get noise
_PREDICTION = {"v_prediction": "v", "epsilon": "epsilon"}  # scheduler config -> modelspec


def tiny_archs() -> tuple[str, ...]:
    """Architectures with a tiny family."""
    return tuple(a.name for a in ARCHITECTURES.values() if "tiny" in a.configs and a.tiny)


def finetunes(arch_name: str) -> dict[str, tuple[str, ...]]:
    """Fine-tune name -> the diffusion key prefixes (after the component prefix) it changes."""
    return dict(ARCHITECTURES[arch_name].tiny.finetunes)


@dataclass(frozen=True)
class TinyFamily:
    """Paths of one tiny family: a base, two fine-tunes and the config folder to load them."""

    arch: str
    base: Path
    a: Path
    b: Path
    config_folder: Path
    layouts: dict[str, Path] = field(default_factory=dict)  # layout name -> finetune_b in it

    @property
    def files(self) -> dict[str, Path]:
        return {"base": self.base, "finetune_a": self.a, "finetune_b": self.b}


def _extras(arch: Architecture) -> dict[str, Tensor]:
    """Non-weight tensors real files carry and diffusers does not load."""
    return {extra.key: extra_tensor_value(extra) for extra in arch.extra_tensors}


def _mark_prediction(arch: Architecture, config_folder: Path, sd: dict[str, Tensor],
                     seed: int) -> None:
    """Make the base satisfy the architecture's own predict_key rule for the tiny scheduler's
    prediction type (a spread-out tensor where the rule reads one)."""
    scheduler = read_json(config_folder / "scheduler" / "scheduler_config.json")
    wanted = _PREDICTION.get(scheduler.get("prediction_type", "epsilon"), "epsilon")
    for rule in arch.checkpoint_save.predict_key.rules:
        if rule.value == wanted and rule.std_above is not None and rule.key in sd:
            generator = torch.Generator().manual_seed(seed)
            shape = sd[rule.key].shape
            sd[rule.key] = 2 * rule.std_above * torch.randn(shape, generator=generator)


def tiny_base_state_dict(arch_name: str, config_folder: Path, seed: int = 0) -> dict[str, Tensor]:
    """The base model's original-layout state dict (contiguous fp32 tensors)."""
    modules = build_components(arch_name, config_folder, seed=seed, as_stored=True)
    sd = original_state_dict(arch_name, modules)
    _mark_prediction(ARCHITECTURES[arch_name], Path(config_folder), sd, seed)
    return sd


def original_state_dict(arch_name: str, modules: dict[str, torch.nn.Module]) -> dict[str, Tensor]:
    """Live diffusers / transformers components (keyed as ``build_components`` keys them, built
    ``as_stored``) as one original-layout single-file state dict, with the non-weight tensors
    real files carry."""
    arch = ARCHITECTURES[arch_name]
    sd: dict[str, Tensor] = {}
    for component, module in modules.items():
        config = getattr(module, "config", None)
        converted = to_original(arch, component, module.state_dict(), config)
        sd.update({k: v.detach().contiguous() for k, v in converted.items()})
    sd.update(_extras(arch))
    return sd


def _changed_by(arch_name: str, finetune: str, key: str, unet_strength: float = UNET_STRENGTH
                ) -> float:
    """The noise strength a fine-tune applies to ``key`` (0.0: unchanged)."""
    arch = ARCHITECTURES[arch_name]
    prefix = arch.diffusion.prefix
    if key.startswith(prefix):
        inner = key[len(prefix):]
        return unet_strength if inner.startswith(arch.tiny.finetunes[finetune]) else 0.0
    if key.endswith(CLIP_MERGE_SKIPS):
        return 0.0
    if any(key.startswith(te.prefix) for te in arch.text_encoders):
        return TEXT_ENCODER_STRENGTH
    return 0.0


def perturb(arch_name: str, base: dict[str, Tensor], finetune: str, seed: int,
            unet_strength: float = UNET_STRENGTH) -> dict[str, Tensor]:
    """A fine-tune of ``base``: seeded noise on the keys ``finetunes(arch_name)`` names."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(base):
        value = base[key]
        strength = _changed_by(arch_name, finetune, key, unet_strength)
        if strength and value.is_floating_point():
            scale = max(value.pow(2).mean().sqrt().item(), _MIN_SCALE) * strength
            value = value + scale * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        out[key] = value
    return out


def write_tiny_family(folder: Path, arch: str = "sd1", seed: int = 0,
                      unet_strength: float = UNET_STRENGTH, replace: bool = True) -> TinyFamily:
    """Write base / finetune_a / finetune_b .safetensors and a tiny config folder into ``folder``.

    Deterministic: the same ``arch``, ``seed`` and ``unet_strength`` give byte-identical files.
    ``unet_strength`` scales the fine-tunes' UNet noise (relative to each tensor's RMS).
    ``replace``: see ``file_sinks.move_into_place``.
    """
    if arch not in tiny_archs():
        raise ValueError(f"no tiny family for arch {arch!r}; choose one of {', '.join(tiny_archs())}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_folder = write_config_folder(arch, folder / "config", size="tiny")
    base = tiny_base_state_dict(arch, config_folder, seed)
    # one metadata key only: safetensors writes several in random order (bytes would differ)
    metadata = {"format": "pt"}
    files = family_files(folder, arch)
    paths = {}
    for i, name in enumerate(("base", *finetunes(arch))):
        sd = base if name == "base" else perturb(arch, base, name, seed * 1000 + i, unet_strength)
        paths[name] = files[name]
        with atomic_path(paths[name], replace=replace) as tmp:
            save_file(sd, str(tmp), metadata=metadata)
    a, b = (paths[name] for name in finetunes(arch))
    layouts = {}
    for layout in ARCHITECTURES[arch].layouts:  # the second fine-tune as its authors store it
        layouts[layout.name] = files[layout.name]
        with atomic_path(layouts[layout.name], replace=replace) as tmp:
            save_file(in_layout(arch, layout.name, load_file(b)), str(tmp), metadata=metadata)
    return TinyFamily(arch, paths["base"], a, b, config_folder, layouts)


def family_files(folder: Path, arch: str) -> dict[str, Path]:
    """The checkpoints ``write_tiny_family`` writes into ``folder`` (beside its config folder):
    base, the two fine-tunes, and the second fine-tune in each of the architecture's layouts."""
    files = {name: Path(folder) / f"{name}.safetensors" for name in ("base", *finetunes(arch))}
    second = files[list(finetunes(arch))[1]].stem
    files.update({layout.name: Path(folder) / f"{second}.{layout.name}.safetensors"
                  for layout in ARCHITECTURES[arch].layouts})
    return files


def in_layout(arch_name: str, layout_name: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict in the layout's spelling, holding only the components it holds."""
    arch = ARCHITECTURES[arch_name]
    layout = arch.layout(layout_name)
    prefixes = tuple(arch.components[c].prefix for c in layout.components)
    out = {}
    for key, value in sd.items():
        if key.startswith(prefixes):
            for rename in reversed(layout.renames):
                key = rename.unapply(key) or key
            out[key] = value
    return out
