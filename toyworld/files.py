"""The world's files: what a build writes, what ships in the package, what a user gets.

A world folder holds three SD1 single-file checkpoints in the original layout (``base``,
``style_a``, ``style_b``; fp16), the tiny SD1 diffusers config folder they load with, the
CLIP scorer (an open_clip model-config JSON and its weights), the house-style aesthetic head
(LAION's ``.pth`` format) and a ready study config searching the house style.

Example:
    >>> world = write_world(Path("toy"))          # doctest: +SKIP
    >>> pipe = load_pipeline(world.base)          # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from merge_backend.atomic_files import atomic_path, atomic_write_text
from toyworld.draw import CENTRED, Layout
from toyworld.world import SAMPLING, STYLED, Style, probe_prompts

SHIPPED = Path(__file__).resolve().parent / "weights"
CHECKPOINTS = ("base", "style_a", "style_b")
CLIP_NAME = "toyworld-clip"
HEAD = "house_head.pth"
MANIFEST = "manifest.json"
WEIGHT_FILES = (*(f"{c}.safetensors" for c in CHECKPOINTS), f"{CLIP_NAME}.json",
                f"{CLIP_NAME}.safetensors", HEAD, MANIFEST)


@dataclass(frozen=True)
class ToyWorld:
    """Paths of one world folder (``write_world`` or a build's output)."""

    folder: Path

    def checkpoint(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    @property
    def base(self) -> Path:
        return self.checkpoint("base")

    @property
    def style_a(self) -> Path:
        return self.checkpoint("style_a")

    @property
    def style_b(self) -> Path:
        return self.checkpoint("style_b")

    @property
    def config_folder(self) -> Path:
        return self.folder / "config"

    @property
    def clip_config(self) -> Path:
        return self.folder / f"{CLIP_NAME}.json"

    @property
    def clip_weights(self) -> Path:
        return self.folder / f"{CLIP_NAME}.safetensors"

    @property
    def house_head(self) -> Path:
        return self.folder / HEAD

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST

    @property
    def study_config(self) -> Path:
        return self.folder / "study.yaml"

    def missing(self) -> list[Path]:
        return [self.folder / name for name in WEIGHT_FILES if not (self.folder / name).is_file()]


def fp16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
            for k, v in state.items()}


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """fp16, one metadata key (safetensors writes several in random order: bytes would vary),
    written beside and renamed into place."""
    with atomic_path(path) as tmp:
        save_file(fp16(state), str(tmp), metadata={"format": "pt"})


def save_torch(obj, path: Path) -> None:
    """A ``torch.save`` archive whose bytes depend on ``obj`` alone: saved to a file,
    torch names the archive's folder after the file, here a temporary name that differs
    every time (so a rebuild's head differed in bytes though not in weights)."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def world_files(folder: Path) -> list[Path]:
    """The files ``write_world`` puts into ``folder`` (beside its config folder)."""
    return [Path(folder) / name for name in WEIGHT_FILES] + [ToyWorld(Path(folder)).study_config]


def write_world(folder: Path, source: Path = SHIPPED, replace: bool = True) -> ToyWorld:
    """Copy a world's weights (the shipped ones by default) into ``folder`` with the config
    folder and a ready study config; returns its paths. Existing files are replaced; without
    ``replace``, one that appeared while writing is kept and FileExistsError raised."""
    from merge_backend.pipeline import write_config_folder

    world = ToyWorld(Path(folder))
    missing = ToyWorld(Path(source)).missing()
    if missing:
        raise FileNotFoundError(f"toy world in {source} is incomplete: {missing[0]} is missing")
    world.folder.mkdir(parents=True, exist_ok=True)
    if Path(source).resolve() != world.folder.resolve():
        for name in WEIGHT_FILES:
            with atomic_path(world.folder / name, replace=replace) as tmp:
                shutil.copyfile(Path(source) / name, tmp)
    write_config_folder("sd1", world.config_folder, size=world_size(Path(source)))
    atomic_write_text(world.study_config, yaml.safe_dump(study_config(world), sort_keys=False),
                      replace)
    return world


def world_size(folder: Path) -> str:
    """The SD1 config size a world was built in (its manifest's plan; "tiny" before plans
    named one)."""
    return manifest(ToyWorld(folder))["plan"].get("size", "tiny")


def world_layouts(folder: Path) -> dict[str, Layout]:
    """Where each data set of a world put its shapes ("base", "style_a", "style_b"; its
    manifest's plan; everywhere centred before plans named layouts)."""
    stored = manifest(ToyWorld(folder))["plan"].get("layouts")
    if stored is None:
        return dict.fromkeys(CHECKPOINTS, CENTRED)
    return {name: Layout(tuple(v["centre"]), v["spread"], tuple(v["radius"]))
            for name, v in stored.items()}


def world_sampling(folder: Path) -> dict[str, Any]:
    """How a world's probes are drawn: its manifest's plan (``toyworld.world.SAMPLING``
    before plans named one)."""
    return dict(manifest(ToyWorld(folder))["plan"].get("sampling", SAMPLING))


def world_styles(folder: Path) -> dict[str, Style]:
    """The style each checkpoint of a world was trained on (its manifest's plan;
    ``toyworld.world.STYLED`` before plans named styles)."""
    stored = manifest(ToyWorld(folder))["plan"].get("styles")
    return dict(STYLED) if stored is None else {n: Style(**v) for n, v in stored.items()}


def manifest(world: ToyWorld) -> dict:
    return json.loads(world.manifest.read_text(encoding="utf-8"))


def study_probes(world: ToyWorld) -> dict[str, Any]:
    """The probes of a study in this world (its study config's, the demo's): the probe
    prompts, one seed, drawn as the world draws them."""
    return {"prompts": probe_prompts(), "seeds": [1], **world_sampling(world.folder),
            "batch_size": 4}


def study_config(world: ToyWorld) -> dict:
    """A study merging style A and style B towards the house style (paths relative to the
    YAML file, so the folder can move)."""
    return {
        "name": "toyworld-house",
        "models": {"model1": world.style_a.name, "model2": world.style_b.name},
        "config_folder": world.config_folder.name,
        "merge": {"method": "weighted_sum", "vocabulary": "mbw", "arithmetic": "fast"},
        "probes": study_probes(world),
        "scorers": [
            {"kind": "laion_aesthetic", "name": "house", "model": world.clip_config.name,
             "weights": world.clip_weights.name, "head": world.house_head.name,
             "range": [0.0, 1.0]},
            {"kind": "clip", "name": "prompt", "model": world.clip_config.name,
             "weights": world.clip_weights.name, "weight": 0.25, "range": [0.0, 60.0]},
        ],
        "sampler": {"name": "tpe", "seed": 0},
        "warm_start": {"model1": True, "model2": True, "uniform": [0.5]},
        "trials": 200,
        "output": "runs",
    }
