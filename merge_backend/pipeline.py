"""Diffusers pipelines for original-layout checkpoints, fully offline.

A single-file checkpoint is loaded with diffusers' own ``from_single_file`` against a local
config folder (``write_config_folder``), so nothing is fetched from a model hub. The merge
engine instead starts from ``empty_pipeline`` and writes weights into it.

Example:
    >>> pipe = load_pipeline(Path("model.safetensors"))  # doctest: +SKIP
    >>> image = pipe("a red apple", num_inference_steps=20).images[0]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merge_backend.architectures import ARCHITECTURES, Architecture, detect_architecture
from merge_backend.modules import build_module, module_class
from merge_backend.pipeline_configs import (
    CACHE_ENV,
    cache_dir,
    config_files,
    read_json,
    sizes,
    write_config_folder,
)
from merge_backend.safetensors_io import read_header

__all__ = ["CACHE_ENV", "build_components", "build_module", "cache_dir", "component_folders",
           "empty_pipeline", "infer_size", "load_pipeline", "pipeline_from_components",
           "write_config_folder"]


# ---------------------------------------------------------------------------- modules


def component_folders(arch: Architecture) -> dict[str, str]:
    """Component name -> diffusers pipeline folder ('te2' -> 'text_encoder_2', ...)."""
    return {c.name: c.folder for c in arch.components.values()}


def build_components(arch_name: str, config_folder: Path, *, seed: int = 0,
                     device: str | torch.device = "cpu", as_stored: bool = False
                     ) -> dict[str, nn.Module]:
    """Every weighted component of ``arch_name`` with seeded random fp32 weights, built on
    ``device`` (initialising a full-size UNet on a GPU takes a fraction of the CPU time).
    ``as_stored``: the modules as single files store them (see ``build_module``).

    The global RNG is left as it was; the same seed on the same device gives the same weights.
    """
    arch = ARCHITECTURES[arch_name]
    modules = {}
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), device:
        torch.manual_seed(seed)
        for component, sub in component_folders(arch).items():
            config = read_json(Path(config_folder) / sub / "config.json")
            module = build_module(component, config, arch=arch, as_stored=as_stored).eval()
            with torch.no_grad():  # weights the original model holds as the identity
                for name in arch.components[component].identity:
                    weight = module.get_parameter(name)
                    weight.copy_(torch.eye(*weight.shape))
            modules[component] = module
    return modules


def _moved(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    # diffusers warns on every .to(dtype=...), even a no-op one; only move what must move
    param = next(module.parameters())
    if param.dtype != dtype:
        module.to(dtype=dtype)
    if param.device != torch.device(device):
        module.to(device)
    return module


def _extras(index: Mapping[str, Any]) -> dict[str, Any]:
    """What a pipeline takes besides its modules: parts the folder leaves out ([null, null],
    e.g. the safety checker) and plain settings (requires_safety_checker, …)."""
    out: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if value == [None, None]:
            out[name] = None
        elif not isinstance(value, list):
            out[name] = value
    return out


def pipeline_from_components(arch_name: str, modules: Mapping[str, nn.Module],
                             config_folder: Path, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32):
    """A pipeline from live modules (keyed by component: unet/vae/te/te1/te2) plus the folder's
    scheduler and tokenizer(s). The modules are moved to ``device`` / ``dtype``, not copied."""
    arch = ARCHITECTURES[arch_name]
    folder = Path(config_folder)
    index = read_json(folder / "model_index.json")
    scheduler_cls = module_class(*index["scheduler"])
    kwargs: dict[str, Any] = {"scheduler": scheduler_cls.from_pretrained(folder, subfolder="scheduler")}
    for component, sub in component_folders(arch).items():
        kwargs[sub] = _moved(modules[component], device, dtype)
    for sub in arch.tokenizers:
        kwargs[sub] = module_class(*index[sub]).from_pretrained(folder / sub)
    kwargs.update(_extras(index))
    pipe = module_class("diffusers", index["_class_name"])(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def empty_pipeline(arch_name: str, size: str = "full", device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, *, seed: int = 0,
                   config_folder: Path | None = None):
    """A pipeline of ``arch_name`` with seeded random weights, for the merge engine to overwrite
    (and, at size "tiny", the tests' random pipelines).

    Random (not uninitialised) weights keep buffers such as ``position_ids`` right and make
    a forgotten tensor visible as noise rather than as leftover memory.
    """
    if size not in sizes(arch_name):
        raise ValueError(f"size must be one of {sizes(arch_name)}, got {size!r}")
    folder = config_folder or write_config_folder(arch_name, size=size)
    modules = build_components(arch_name, folder, seed=seed, device=device)
    return pipeline_from_components(arch_name, modules, folder, device=device, dtype=dtype)


# ---------------------------------------------------------------------------- single files


def checkpoint_keys(checkpoint: Path) -> list[str]:
    """Tensor names of a .safetensors file, without reading the tensors (header checked)."""
    return list(read_header(Path(checkpoint))[0])


@cache
def _diffusion_numel(arch_name: str, size: str) -> int:
    arch = ARCHITECTURES[arch_name]
    config = config_files(arch_name, size)[f"{arch.diffusion.folder}/config.json"]
    with torch.device("meta"):
        module = build_module(arch.diffusion.name, config, arch=arch)
    # the state dict, as files store it: persistent buffers (SD3's positional table) count
    return sum(t.numel() for t in module.state_dict().values())


def infer_size(checkpoint: Path, arch_name: str) -> str:
    """Which of the architecture's config folders ('full', 'tiny', …) fits the file: the one
    whose diffusion model holds as many weights as the file's."""
    arch = ARCHITECTURES[arch_name]
    table, _ = read_header(Path(checkpoint))
    prefix = arch.diffusion.prefix
    numel = sum(info.nbytes // info.dtype.itemsize for key, info in table.items()
                if key.startswith(prefix))
    for size in sizes(arch_name):
        if _diffusion_numel(arch_name, size) == numel:
            return size
    raise ValueError(f"{checkpoint}: its {arch.diffusion.name} ({numel:,} weights) matches no "
                     f"{arch_name} config ({', '.join(sizes(arch_name))}); pass "
                     "config_folder=<a diffusers folder with model_index.json and configs>")


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
    arch_obj = ARCHITECTURES[arch_name]
    if arch_obj.pipeline_loader == "converters":
        pipe = _converted_pipeline(arch_obj, checkpoint, Path(config_folder), device, dtype)
    else:
        index = read_json(Path(config_folder) / "model_index.json")
        cls = getattr(diffusers, index["_class_name"])
        pipe = cls.from_single_file(str(checkpoint), config=str(config_folder), torch_dtype=dtype,
                                    local_files_only=True, **_extras(index))
        _finish_modules(pipe)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
    _own_aligned_storage(pipe)
    return pipe


def _finish_modules(pipe) -> None:
    """What a single-file load leaves undone: every module in eval mode (diffusers builds T5
    in training mode, so its dropout would make every image differ), and tied weights tied
    (it loads T5's ``shared`` embedding but leaves the tied ``encoder.embed_tokens`` on the
    meta device)."""
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval()
        if isinstance(module, nn.Module) and any(p.is_meta for p in module.parameters()):
            if hasattr(module, "tie_weights"):
                module.tie_weights()
            left = [n for n, p in module.named_parameters() if p.is_meta]
            if left:
                raise ValueError(f"the single file did not fill {type(module).__name__}'s "
                                 f"{', '.join(left[:3])}")


def _converted_pipeline(arch: Architecture, checkpoint: Path, config_folder: Path,
                        device: str | torch.device, dtype: torch.dtype):
    """The pipeline of the config folder, its weights converted from the file by this
    project's converters (``naming.to_diffusers``) instead of diffusers' single-file loader."""
    from accelerate import init_empty_weights

    from merge_backend.checkpoint import open_checkpoint
    from merge_backend.naming import to_diffusers

    ckpt = open_checkpoint(checkpoint)
    modules = {}
    for c in arch.components.values():
        with init_empty_weights():  # parameters on the meta device, buffers real
            module = build_module(c.name, read_json(config_folder / c.folder / "config.json"),
                                  arch=arch).eval()
        original = {k: ckpt.get(k) for k in ckpt.keys() if k.startswith(c.prefix)}
        weights = to_diffusers(arch, c.name, original, module, strict=False)
        weights = {k: v.to(dtype if v.is_floating_point() else v.dtype).contiguous().clone()
                   for k, v in weights.items()}
        module.load_state_dict(weights, strict=False, assign=True)
        if hasattr(module, "tie_weights"):
            module.tie_weights()
        left = [n for n, p in module.named_parameters() if p.is_meta]
        if left:
            raise ValueError(f"{checkpoint}: holds no {c.name} weights for {', '.join(left[:3])}"
                             f" ({len(left)} in all); a {arch.title} file with every component "
                             "is needed to build a pipeline")
        modules[c.name] = module
    return pipeline_from_components(arch.name, modules, config_folder, device, dtype)


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
