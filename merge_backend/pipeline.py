"""Diffusers pipelines for original-layout checkpoints, fully offline.

A single-file checkpoint is loaded with diffusers' own ``from_single_file`` against a local
config folder (``write_config_folder``), so nothing is fetched from a model hub. The merge
engine instead starts from ``empty_pipeline`` and writes weights into it.

Example:
    >>> pipe = load_pipeline(Path("model.safetensors"))  # doctest: +SKIP
    >>> image = pipe("a red apple", num_inference_steps=20).images[0]  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge_backend.architectures import ARCHITECTURES, Architecture, detect_architecture
from merge_backend.pipeline_configs import CONFIG_FOLDERS, SIZES, TOKENIZER_FOLDERS
from merge_backend.safetensors_io import read_header

CACHE_ENV = "MERGESEARCH_CACHE"
_PIPELINE_CLASSES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                     "sdxl": "StableDiffusionXLPipeline"}
_N_MERGES = 49152 - 256 - 2  # CLIP's BPE: 48894 merges after the version line


def cache_dir() -> Path:
    """Where config folders go by default: $MERGESEARCH_CACHE, else ~/.cache/mergesearch."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergesearch"


# ---------------------------------------------------------------------------- config folders


@lru_cache(maxsize=1)
def _clip_bpe_files() -> tuple[str, str]:
    """vocab.json and merges.txt text of the real CLIP BPE, from open_clip's bundled copy."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    renames = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renames.get(token, token): i for token, i in SimpleTokenizer().encoder.items()}
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = "#version: 0.2\n" + "\n".join(lines[1:_N_MERGES + 1]) + "\n"
    return json.dumps(vocab, ensure_ascii=False), merges


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # write-then-rename so a concurrent reader never sees half a file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; config files are not secrets
    os.replace(tmp, path)


def write_config_folder(arch_name: str, folder: Path | None = None, size: str = "full") -> Path:
    """Write the diffusers config folder of ``arch_name`` (no weights) and return its path.

    ``size`` is "full" (SD1.5, SD2.1-v, SDXL base) or "tiny" (the test families). Without
    ``folder`` it goes under ``cache_dir()``. Idempotent: files already right are not rewritten.
    """
    if (arch_name, size) not in CONFIG_FOLDERS:
        known = ", ".join(f"{a}/{s}" for a, s in CONFIG_FOLDERS)
        raise ValueError(f"no config folder for arch {arch_name!r} size {size!r}; known: {known}")
    folder = Path(folder) if folder is not None else cache_dir() / "configs" / f"{arch_name}-{size}"
    files = CONFIG_FOLDERS[(arch_name, size)]
    for name, content in files.items():
        _write_if_changed(folder / name, json.dumps(content, indent=2, sort_keys=True) + "\n")
    vocab, merges = _clip_bpe_files()
    for tokenizer in TOKENIZER_FOLDERS:
        if f"{tokenizer}/tokenizer_config.json" in files:
            config = files[f"{tokenizer}/tokenizer_config.json"]
            special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
            special_json = json.dumps(special, indent=2) + "\n"
            _write_if_changed(folder / tokenizer / "special_tokens_map.json", special_json)
            _write_if_changed(folder / tokenizer / "vocab.json", vocab)
            _write_if_changed(folder / tokenizer / "merges.txt", merges)
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- modules


def build_module(component: str, config: Mapping[str, Any], *,
                 arch: Architecture | None = None) -> nn.Module:
    """A randomly initialised diffusers / transformers module of one component from its config.

    ``component`` is "unet", "vae", "te", "te1" or "te2"; text encoders whose config lists
    ``CLIPTextModelWithProjection`` (SDXL's te2) get that class. Build under
    ``torch.device("meta")`` for a shape-only module.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = dict(config)
    if component == "unet":
        return UNet2DConditionModel.from_config(config)
    if component == "vae":
        return AutoencoderKL.from_config(config)
    if component in ("te", "te1", "te2"):
        with_projection = "CLIPTextModelWithProjection" in config.get("architectures", ())
        if arch is not None and arch.name == "sdxl" and component == "te2":
            with_projection = True
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        clean = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
        return cls(CLIPTextConfig(**clean))
    raise ValueError(f"unknown component {component!r}; expected unet, vae, te, te1 or te2")


def component_folders(arch: Architecture) -> dict[str, str]:
    """Component name -> diffusers pipeline folder ('te2' -> 'text_encoder_2', ...)."""
    out = {"unet": "unet", "vae": "vae"}
    out.update({te.name: te.diffusers_folder for te in arch.text_encoders})
    return out


def build_components(arch_name: str, config_folder: Path, *, seed: int = 0,
                     device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """Every weighted component of ``arch_name`` with seeded random fp32 weights, built on
    ``device`` (initialising a full-size UNet on a GPU takes a fraction of the CPU time).

    The global RNG is left as it was; the same seed on the same device gives the same weights.
    """
    arch = ARCHITECTURES[arch_name]
    modules = {}
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), device:
        torch.manual_seed(seed)
        for component, sub in component_folders(arch).items():
            config = _read_json(Path(config_folder) / sub / "config.json")
            modules[component] = build_module(component, config, arch=arch).eval()
    return modules


def _moved(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    # diffusers warns on every .to(dtype=...), even a no-op one; only move what must move
    param = next(module.parameters())
    if param.dtype != dtype:
        module.to(dtype=dtype)
    if param.device != torch.device(device):
        module.to(device)
    return module


def pipeline_from_components(arch_name: str, modules: Mapping[str, nn.Module],
                             config_folder: Path, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32):
    """A pipeline from live modules (keyed unet/vae/te/te1/te2) plus the folder's scheduler and
    tokenizer(s). The modules are moved to ``device`` / ``dtype``, not copied."""
    import diffusers
    from transformers import CLIPTokenizer

    arch = ARCHITECTURES[arch_name]
    folder = Path(config_folder)
    index = _read_json(folder / "model_index.json")
    scheduler_cls = getattr(diffusers, index["scheduler"][1])
    scheduler = scheduler_cls.from_pretrained(folder, subfolder="scheduler")
    kwargs: dict[str, Any] = {"scheduler": scheduler}
    for component, sub in component_folders(arch).items():
        kwargs[sub] = _moved(modules[component], device, dtype)
    for tokenizer in TOKENIZER_FOLDERS:
        if tokenizer in index:
            kwargs[tokenizer] = CLIPTokenizer.from_pretrained(folder / tokenizer)
    if arch_name != "sdxl":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, _PIPELINE_CLASSES[arch_name])(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def empty_pipeline(arch_name: str, size: str = "full", device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, *, seed: int = 0,
                   config_folder: Path | None = None):
    """A pipeline of ``arch_name`` with seeded random weights, for the merge engine to overwrite.

    Random (not uninitialised) weights keep buffers such as ``position_ids`` right and make
    a forgotten tensor visible as noise rather than as leftover memory.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    folder = config_folder or write_config_folder(arch_name, size=size)
    modules = build_components(arch_name, folder, seed=seed, device=device)
    return pipeline_from_components(arch_name, modules, folder, device=device, dtype=dtype)


# ---------------------------------------------------------------------------- single files


def checkpoint_keys(checkpoint: Path) -> list[str]:
    """Tensor names of a .safetensors file, without reading the tensors (header checked)."""
    return list(read_header(Path(checkpoint))[0])


def infer_size(checkpoint: Path, arch_name: str) -> str:
    """'full' or 'tiny': which known config folder matches the file's UNet width."""
    key = "model.diffusion_model.input_blocks.0.0.weight"
    table, _ = read_header(Path(checkpoint))
    if key not in table:
        raise ValueError(f"{checkpoint}: no tensor {key!r}; not a {arch_name} UNet")
    width = table[key].shape[0]
    for size in SIZES:
        config = CONFIG_FOLDERS.get((arch_name, size))
        if config and config["unet/config.json"]["block_out_channels"][0] == width:
            return size
    raise ValueError(f"{checkpoint}: UNet width {width} matches no known {arch_name} config; "
                     "pass config_folder=<a diffusers folder with model_index.json and configs>")


def load_pipeline(checkpoint: Path, *, arch: str | Architecture | None = None,
                  config_folder: Path | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32):
    """Load an original-layout .safetensors file as a diffusers pipeline, offline.

    ``arch`` is detected from the key names when not given; ``config_folder`` defaults to the
    cached folder of the detected architecture and size. The safety checker is off.
    """
    import diffusers

    if os.environ.get("DIFFUSERS_VERBOSITY") == "error":  # the mergesearch command asks for quiet
        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if arch is None:
        arch = detect_architecture(checkpoint_keys(checkpoint), source=str(checkpoint))
    arch_name = arch if isinstance(arch, str) else arch.name
    if config_folder is None:
        config_folder = write_config_folder(arch_name, size=infer_size(checkpoint, arch_name))
    cls = getattr(diffusers, _PIPELINE_CLASSES[arch_name])
    no_checker = {"safety_checker": None, "requires_safety_checker": False}
    extra = {} if arch_name == "sdxl" else no_checker
    pipe = cls.from_single_file(str(checkpoint), config=str(config_folder), torch_dtype=dtype,
                                local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    _own_aligned_storage(pipe)
    return pipe


def _own_aligned_storage(pipe) -> None:
    """Give every weight its own freshly allocated (aligned) storage.

    Weights loaded from a single file can sit at the file's 4-byte offsets; some CPU kernels
    then take another code path and round differently, so the same bits would draw a slightly
    different image than the merge engine's aligned buffers do.
    """
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            for tensor in list(module.parameters()) + list(module.buffers()):
                if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone()
