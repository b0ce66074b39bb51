"""diffusers pipeline folders as sources: read, converted to the original single-file layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .architectures import ARCHITECTURES, Architecture
from .checkpoint import Checkpoint, CheckpointError
from .naming import to_original
from .safetensors_io import SafetensorsError, read_header, read_tensor
from .source_files import check_source

_PIPELINE_ARCH = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionPipeline": None}


def _read_json(path: Path) -> dict:
    check_source(path, error=CheckpointError)  # a FIFO would block read_text forever
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _architecture(folder: Path, index: dict) -> Architecture:
    name = _PIPELINE_ARCH.get(index.get("_class_name", ""), "missing")
    if name == "missing":
        raise CheckpointError(f"{folder}: not supported: a {index.get('_class_name')} pipeline "
                              "(mergesearch merges SD1.x, SD2.x and SDXL)")
    if name is None:  # SD1 and SD2 share the pipeline class; the text encoder tells them apart
        te = _read_json(folder / "text_encoder" / "config.json")
        name = "sd2" if te.get("hidden_act") == "gelu" else "sd1"
    return ARCHITECTURES[name]


def _component_state(folder: Path, sub: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / sub).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder / sub}: no .safetensors weights (.bin files are pickles; "
                              "convert them first)")
    state: dict[str, torch.Tensor] = {}
    for file in files:  # the same header checks as single files, tensors read into memory
        try:
            table, _ = read_header(file)
            state.update({key: read_tensor(file, info) for key, info in table.items()})
        except SafetensorsError as exc:
            raise CheckpointError(str(exc)) from None
    return state


def open_diffusers_folder(folder: Path) -> Checkpoint:
    """A diffusers pipeline folder as an original-layout Checkpoint (held in memory)."""
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise CheckpointError(f"{folder}: a folder, but not a diffusers pipeline (no model_index.json)")
    arch = _architecture(folder, _read_json(index_path))
    tensors: dict[str, torch.Tensor] = {}
    subs = {"unet": "unet", "vae": "vae"}
    subs.update({te.name: te.diffusers_folder for te in arch.text_encoders})
    for component, sub in subs.items():
        config_path = folder / sub / "config.json"
        config = _read_json(config_path) if component in ("unet", "vae") else None
        try:
            tensors.update(to_original(arch, component, _component_state(folder, sub), config))
        except ValueError as exc:
            raise CheckpointError(f"{folder / sub}: {exc}") from None
    return Checkpoint(folder, arch, {k: tuple(v.shape) for k, v in tensors.items()},
                      {k: v.dtype for k, v in tensors.items()}, tensors.__getitem__, {})
