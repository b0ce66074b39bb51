"""diffusers pipeline folders as sources: read, converted to the original single-file layout.

Which architecture a folder holds is data: the pipeline class its ``model_index.json`` names
(each architecture's config folder names its own) and, where several architectures share a
class (SD1 and SD2), the config fields in the architecture file's ``diffusers_folder``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .architectures import ARCHITECTURES, Architecture
from .naming import to_original
from .safetensors_io import SafetensorsError, read_header, read_tensor
from .source_files import check_source


class DiffusersFolderError(ValueError):
    """A folder that cannot be read as a pipeline; the message names the folder or file."""


def _read_json(path: Path) -> dict:
    check_source(path, error=DiffusersFolderError)  # a FIFO would block read_text forever
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DiffusersFolderError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise DiffusersFolderError(f"{path}: not a JSON object")
    return data


def _fits(folder: Path, arch: Architecture) -> bool:
    for file, fields in arch.diffusers_folder.items():
        config = _read_json(folder / file) if (folder / file).is_file() else {}
        if any(config.get(k) != v for k, v in fields.items()):
            return False
    return True


def _architecture(folder: Path, index: dict) -> Architecture:
    pipeline = index.get("_class_name")
    same_class = [a for a in ARCHITECTURES.values() if a.pipeline_class == pipeline]
    found = [a for a in same_class if _fits(folder, a)]
    if len(found) != 1:
        what = "several" if found else "no"
        titles = ", ".join(a.title for a in ARCHITECTURES.values())
        raise DiffusersFolderError(f"{folder}: not supported: a {pipeline} pipeline that fits "
                                   f"{what} known architecture (mergesearch merges {titles})")
    return found[0]


def _component_state(folder: Path, sub: str) -> dict[str, torch.Tensor]:
    files = sorted((folder / sub).glob("*.safetensors"))
    if not files:
        raise DiffusersFolderError(f"{folder / sub}: no .safetensors weights (.bin files are "
                                   "pickles; convert them first)")
    state: dict[str, torch.Tensor] = {}
    for file in files:  # the same header checks as single files, tensors read into memory
        try:
            table, _ = read_header(file)
            state.update({key: read_tensor(file, info) for key, info in table.items()})
        except SafetensorsError as exc:
            raise DiffusersFolderError(str(exc)) from None
    return state


def read_diffusers_folder(folder: Path) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """A diffusers pipeline folder's architecture and its weights in the original layout."""
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise DiffusersFolderError(f"{folder}: a folder, but not a diffusers pipeline "
                                   "(no model_index.json)")
    arch = _architecture(folder, _read_json(index_path))
    tensors: dict[str, torch.Tensor] = {}
    for component in arch.components.values():
        config = _read_json(folder / component.folder / "config.json")
        state = _component_state(folder, component.folder)
        try:
            tensors.update(to_original(arch, component.name, state, config))
        except ValueError as exc:
            raise DiffusersFolderError(f"{folder / component.folder}: {exc}") from None
    return arch, tensors
