"""A tiny model family with the real SD1 / SDXL topology and file layout, made from a seed.

Three original-layout single files (UNet, text encoder(s), VAE; fp32) and the tiny diffusers
config folder beside them, so that every code path - detection, merging, loading, generating,
exporting - runs on a laptop CPU in well under a second per image.

What differs from ``base`` (UNet keys after 'model.diffusion_model.'):
- ``finetune_a``: every tensor under ``input_blocks.`` (strongly) and every text encoder
  float tensor (slightly);
- ``finetune_b``: every tensor under ``output_blocks.`` (strongly) and every text encoder
  float tensor (slightly).
Everything else (time_embed, label_emb, middle_block, out, VAE, position_ids, logit_scale)
is byte-identical to ``base``.

Example:
    >>> fam = write_tiny_family(Path("/tmp/tiny"), "sd1", seed=0)  # doctest: +SKIP
    >>> pipe = load_pipeline(fam.base, config_folder=fam.config_folder)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from merge_backend.architectures import ARCHITECTURES, UNET_PREFIX
from merge_backend.naming import to_original
from merge_backend.pipeline import build_components, write_config_folder

TINY_ARCHS = ("sd1", "sdxl")
# finetune name -> UNet key prefixes (after 'model.diffusion_model.') it changes strongly
FINETUNE_BLOCKS: dict[str, tuple[str, ...]] = {"finetune_a": ("input_blocks.",),
                                               "finetune_b": ("output_blocks.",)}
UNET_STRENGTH = 0.5  # noise std relative to each tensor's RMS
TEXT_ENCODER_STRENGTH = 0.02
_MIN_SCALE = 0.01  # zero-initialised tensors (biases) still get noise


@dataclass(frozen=True)
class TinyFamily:
    """Paths of one tiny family: a base, two fine-tunes and the config folder to load them."""

    arch: str
    base: Path
    a: Path
    b: Path
    config_folder: Path

    @property
    def files(self) -> dict[str, Path]:
        return {"base": self.base, "finetune_a": self.a, "finetune_b": self.b}


def _extras(arch_name: str) -> dict[str, Tensor]:
    """Non-weight keys real files carry and diffusers does not load."""
    arch = ARCHITECTURES[arch_name]
    out = {}
    for te in arch.text_encoders:
        if te.kind == "hf_clip":
            positions = torch.arange(77, dtype=torch.int64)[None]
            out[te.prefix + "text_model.embeddings.position_ids"] = positions
        elif arch_name == "sdxl":
            # the value SDXL base 1.0 stores
            out[te.prefix + "logit_scale"] = torch.tensor(4.6055, dtype=torch.float32)
    return out


def tiny_base_state_dict(arch_name: str, config_folder: Path, seed: int = 0) -> dict[str, Tensor]:
    """The base model's original-layout state dict (contiguous fp32 tensors)."""
    arch = ARCHITECTURES[arch_name]
    modules = build_components(arch_name, config_folder, seed=seed)
    sd: dict[str, Tensor] = {}
    for component, module in modules.items():
        config = getattr(module, "config", None)
        config = dict(config) if component in ("unet", "vae") else None
        converted = to_original(arch, component, module.state_dict(), config)
        sd.update({k: v.detach().contiguous() for k, v in converted.items()})
    sd.update(_extras(arch_name))
    return sd


def _changed_by(arch_name: str, finetune: str, key: str, unet_strength: float = UNET_STRENGTH
                ) -> float:
    """The noise strength a fine-tune applies to ``key`` (0.0: unchanged)."""
    arch = ARCHITECTURES[arch_name]
    if key.startswith(UNET_PREFIX):
        inner = key[len(UNET_PREFIX):]
        return unet_strength if inner.startswith(FINETUNE_BLOCKS[finetune]) else 0.0
    if key.endswith(arch.clip_skip_suffixes):
        return 0.0
    if any(key.startswith(te.prefix) for te in arch.text_encoders):
        return TEXT_ENCODER_STRENGTH
    return 0.0


def perturb(arch_name: str, base: dict[str, Tensor], finetune: str, seed: int,
            unet_strength: float = UNET_STRENGTH) -> dict[str, Tensor]:
    """A fine-tune of ``base``: seeded noise on the keys ``FINETUNE_BLOCKS`` names."""
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
                      unet_strength: float = UNET_STRENGTH) -> TinyFamily:
    """Write base / finetune_a / finetune_b .safetensors and a tiny config folder into ``folder``.

    Deterministic: the same ``arch``, ``seed`` and ``unet_strength`` give byte-identical files.
    ``unet_strength`` scales the fine-tunes' UNet noise (relative to each tensor's RMS).
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"no tiny family for arch {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_folder = write_config_folder(arch, folder / "config", size="tiny")
    base = tiny_base_state_dict(arch, config_folder, seed)
    # one metadata key only: safetensors writes several in random order (bytes would differ)
    metadata = {"format": "pt"}
    paths = {}
    for i, name in enumerate(("base", *FINETUNE_BLOCKS)):
        sd = base if name == "base" else perturb(arch, base, name, seed * 1000 + i, unet_strength)
        paths[name] = folder / f"{name}.safetensors"
        save_file(sd, str(paths[name]), metadata=metadata)
    return TinyFamily(arch, paths["base"], paths["finetune_a"], paths["finetune_b"], config_folder)
