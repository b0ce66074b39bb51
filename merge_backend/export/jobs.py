"""Planning and running exports: every check first, then the files, each one atomically.

``plan_exports`` validates everything an export needs before anything is written: each
Recipe, that every source file exists and still has the sha256 the Recipe recorded, that the
SuperMerger conversion is exact (or allowed to be lossy), that no output would overwrite a
source or (without ``overwrite``) an existing file. ``run_exports`` then writes the outputs.

Formats and the names they write are ``FORMATS`` (``STEM`` is the item's stem, e.g.
``mystudy-trial7``). With one item and one format, an output path ending in the format's
suffix names the file itself (comfyui: ``X.json`` and ``X.api.json``); otherwise it is the
folder written into.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_backend.atomic_files import atomic_write_text, scratch_folder
from merge_backend.checkpoint import CKPT_SUFFIXES, CheckpointError
from merge_backend.hashing import sha256_of
from merge_backend.lora.extract import ExtractResult, check_names, extract_lora
from merge_backend.lora.formats import LoraError
from merge_backend.lora.svd import DEFAULT_CLAMP, check_clamp
from merge_backend.merge_file import DTYPES, merge_to_file
from merge_backend.output_files import check_output_folder
from merge_backend.recipe import Recipe, RecipeError
from merge_backend.source_files import holds

from .comfyui import ComfyPrompt, comfy_settings, comfy_workflow, write_comfy_workflow
from .diffusers_export import export_diffusers
from .mbw import mbw_ratios, mbw_string
from .report import Column, ReportImage, render_report


@dataclass(frozen=True)
class Format:
    """What one export format writes: file names (``{stem}`` is the item's stem) and meaning."""

    names: tuple[str, ...]
    what: str


# in the order they are written: a checkpoint first, so a diffusers folder or a LoRA reuses it
FORMATS: dict[str, Format] = {
    "checkpoint": Format(("{stem}.safetensors",),
                         "the merged checkpoint (ComfyUI, A1111 and diffusers load it) with the "
                         "Recipe, study, trial and scores in its metadata"),
    "diffusers": Format(("{stem}-diffusers",), "a diffusers pipeline folder"),
    "comfyui": Format(("{stem}.comfyui.json", "{stem}.comfyui.api.json"),
                      "a ComfyUI workflow (editor and API formats) that rebuilds the merge from "
                      "the source checkpoints"),
    "mbw": Format(("{stem}.mbw.txt",), "SuperMerger's block-weight line"),
    "report": Format(("{stem}.report.html",),
                     "probe images, ratio chart, scores and Recipe on one page"),
    "lora": Format(("{stem}.lora.safetensors",),
                   "the merge minus --base as a LoRA of --rank (kohya, or ComfyUI's layout with "
                   "--lora-format comfyui)"),
}
# the suffix of an -o that names the file itself, for formats that write a file
_FILE_SUFFIX = {fmt: Path(f.names[0]).suffix for fmt, f in FORMATS.items()
                if Path(f.names[0]).suffix}
Draw = Callable[[Any], bytes]  # a live pipeline -> PNG bytes of its probe grid


class ExportError(ValueError):
    """An export that cannot run; nothing has been written when this is raised in planning."""


@dataclass(frozen=True)
class ExportItem:
    """One merge to export, with what is known about where it came from.

    ``metadata`` goes into the checkpoint (``mergesearch.study`` etc.); ``scores`` and
    ``details`` into the report; ``probe_png`` is the trial's stored probe grid, shown as the
    candidate in the report instead of drawing it again; ``roles`` tells the report's ratio
    chart which blocks were searched, tied or fixed; ``top`` are the study's best trials, shown
    side by side at the end of the report.
    """

    recipe: Recipe
    stem: str
    title: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    scores: Mapping[str, Any] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    prompt: ComfyPrompt | None = None
    probe_png: bytes | None = None
    roles: Mapping[str, str] | None = None
    top: tuple[Column, ...] = ()


@dataclass(frozen=True)
class PlannedOutput:
    item: ExportItem
    format: str
    paths: tuple[Path, ...]


@dataclass
class ExportPlan:
    outputs: list[PlannedOutput]
    dtype: str = "fp16"
    overwrite: bool = False
    mbw_lossy: bool = False
    notes: list[str] = field(default_factory=list)
    lora_base: Path | None = None  # --to lora: the merge minus this checkpoint, as a LoRA
    lora_rank: int = 32
    hashes: dict[str, str] = field(default_factory=dict)  # sha256 by resolved path, checked once
    lora_format: str = "kohya"  # --to lora: kohya or comfyui (LoraSave's layout)
    lora_bias_diff: bool | None = None  # --to lora: norm / bias differences (None: the format's default)
    lora_clamp: float | None = DEFAULT_CLAMP  # --to lora: the factors' clip quantile, or None


# ---------------------------------------------------------------------------- planning


def output_paths(item: ExportItem, fmt: str, output: Path, as_file: bool) -> tuple[Path, ...]:
    """Where ``fmt`` of ``item`` goes (see the module docstring)."""
    if as_file:
        if fmt == "comfyui":
            return output, output.with_name(output.stem + ".api.json")
        return (output,)
    return tuple(output / name.format(stem=item.stem) for name in FORMATS[fmt].names)


def check_sources(recipe: Recipe, hashes: dict[str, str] | None = None) -> None:
    """Every source exists and has the sha256 the Recipe recorded (``hashes`` caches digests)."""
    hashes = {} if hashes is None else hashes
    for role, src in recipe.models.items():
        path = Path(src.path)
        if not path.exists():
            raise ExportError(f"recipe.models.{role}: source {path} is missing (resolved from "
                              f"{Path.cwd()}); put the file back where the recipe points, or "
                              "pass --sources DIR, the folder it is in now")
        if src.sha256 is None:
            continue
        key = str(path.resolve())
        if key not in hashes:
            hashes[key] = sha256_of(path)
        if hashes[key] != src.sha256:
            raise ExportError(
                f"recipe.models.{role}: {path} changed since the merge was scored: its sha256 is "
                f"{hashes[key][:12]}…, the recipe recorded {src.sha256[:12]}…; restore that file "
                "(exporting it now would not reproduce the scored merge)")


def _check_item(item: ExportItem, formats: Sequence[str], mbw_lossy: bool,
                hashes: dict[str, str], notes: list[str]) -> None:
    try:
        item.recipe.validate()
    except RecipeError as exc:
        raise ExportError(f"{item.title}: {exc}") from None
    if item.recipe.loras and "mbw" in formats:
        raise ExportError(f"{item.title}: recipe.loras: a SuperMerger block-weight line holds "
                          "ratios only, not LoRAs; export --to checkpoint / diffusers / comfyui "
                          "instead")
    check_sources(item.recipe, hashes)
    if {"checkpoint", "diffusers", "comfyui"} & set(formats):
        notes.append(f"{item.title}: the checkpoint is the scored candidate ("
                     f"{item.recipe.arithmetic} arithmetic, UNet held in {item.recipe.unet_dtype}, "
                     f"text encoders in {item.recipe.text_encoder_dtype}); "
                     f"{comfy_settings(item.recipe)}")
    if "mbw" in formats:
        try:
            _, lossy_notes = mbw_ratios(item.recipe, lossy=mbw_lossy)
        except ValueError as exc:
            raise ExportError(f"{item.title}: --to mbw: {exc}") from None
        notes += [f"{item.title}: {n}" for n in lossy_notes]
    if "comfyui" in formats:
        try:
            comfy_workflow(item.recipe, prompt=item.prompt, name=item.stem)
        except ValueError as exc:
            raise ExportError(f"{item.title}: --to comfyui: {exc}") from None


def _check_paths(outputs: Sequence[PlannedOutput], overwrite: bool,
                 protected: Sequence[Path]) -> None:
    seen: set[Path] = set()
    keep = {p.resolve() for p in protected}
    keep |= {Path(s.path).resolve() for out in outputs for s in out.item.recipe.models.values()}
    for out in outputs:
        for path in out.paths:
            resolved = path.resolve()
            if any(holds(k, resolved) for k in keep):
                raise ExportError(f"output {path} is a source file or inside a source folder "
                                  "(a model, or the run's own records); choose another -o")
            if resolved in seen:
                raise ExportError(f"two outputs would both be written to {path}; give a folder "
                                  "as -o")
            seen.add(resolved)
            if path.exists() and not overwrite:
                raise ExportError(f"output {path} exists; pass --overwrite to replace it")
            if path.exists() and (path.is_dir() != (out.format == "diffusers")):
                raise ExportError(f"output {path} exists and is a "
                                  f"{'folder' if path.is_dir() else 'file'}; remove it first")
            check_output_folder(path, ExportError)


def plan_exports(items: Sequence[ExportItem], formats: Sequence[str], output: Path, *,
                 dtype: str = "fp16", overwrite: bool = False, mbw_lossy: bool = False,
                 protected: Sequence[Path] = (), lora_base: Path | None = None,
                 lora_rank: int = 32, lora_format: str = "kohya",
                 lora_bias_diff: bool | None = None,
                 lora_clamp: float | None = DEFAULT_CLAMP) -> ExportPlan:
    """Check everything and decide every output path; raise ExportError, writing nothing.

    ``protected``: further paths no output may take (the export's own source file).
    """
    if not items:
        raise ExportError("nothing to export")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    formats = list(dict.fromkeys(formats))
    output = Path(output)
    as_file = (len(items) == 1 and len(formats) == 1
               and output.suffix.lower() == _FILE_SUFFIX.get(formats[0]))
    # a file name: one a format writes, or a pickle checkpoint's, which no format writes
    if not as_file and output.suffix.lower() in (*_FILE_SUFFIX.values(), ".htm", *CKPT_SUFFIXES):
        if len(items) == 1 and len(formats) == 1:
            wanted = _FILE_SUFFIX.get(formats[0])
            raise ExportError(f"-o {output}: --to {formats[0]} writes "
                              + (f"a {wanted} file; name one ending in {wanted}" if wanted
                                 else "a folder") + ", or give a folder to write into")
        raise ExportError(f"-o {output} names a file, but {len(items)} item(s) x "
                          f"{len(formats)} format(s) are written; give a folder")
    if output.exists() and not output.is_dir() and not as_file:
        raise ExportError(f"-o {output} is a file; give a folder (or one format and one trial "
                          "with a matching suffix)")
    notes: list[str] = []
    hashes: dict[str, str] = {}
    for item in items:
        _check_item(item, formats, mbw_lossy, hashes, notes)
        if "lora" in formats:
            _check_lora_base(item, lora_base, lora_rank, lora_format, lora_bias_diff)
            check_clamp(lora_clamp, ExportError)
    outputs = [PlannedOutput(item, fmt, output_paths(item, fmt, output, as_file))
               for item in items for fmt in formats]
    _check_paths(outputs, overwrite, [*protected, *([lora_base] if lora_base else [])])
    return ExportPlan(outputs, dtype, overwrite, mbw_lossy, notes, lora_base, lora_rank, hashes,
                      lora_format, lora_bias_diff, lora_clamp)


def _check_lora_base(item: ExportItem, base: Path | None, rank: int, fmt: str,
                     bias_diff: bool | None) -> None:
    from merge_backend.checkpoint import open_checkpoint

    if base is None:
        raise ExportError("--to lora exports the merge as a difference LoRA against a base: "
                          "pass --base FILE")
    if rank < 1:
        raise ExportError(f"--rank {rank}: a LoRA rank is a positive whole number")
    try:
        base_file = open_checkpoint(base)
    except (CheckpointError, OSError) as exc:
        raise ExportError(f"--base {base}: {exc}") from None
    arch = base_file.arch
    if arch.name != item.recipe.arch:
        raise ExportError(f"--base {base} is {arch.title}; {item.title} is {item.recipe.arch}")
    try:
        check_names(base_file, fmt, bias_diff)  # Flux.1, SD3.x: before any merge
    except LoraError as exc:
        raise ExportError(f"--to lora: {exc}") from None


# ---------------------------------------------------------------------------- running


def _checkpoint_metadata(item: ExportItem) -> dict[str, str]:
    return {**{k: str(v) for k, v in item.metadata.items()},
            "mergesearch.comfyui": comfy_settings(item.recipe)}


def report_images(item: ExportItem, draw: Draw | None, *, config_folder: Path | None = None,
                  device: str = "cpu") -> tuple[list[ReportImage], list[str]]:
    """The candidate's probe grid beside both parents' (drawn with ``draw``), and notes."""
    if draw is None:
        note = "no probe set: images omitted (pass --probes to draw them)"
        stored = [ReportImage(f"candidate: {item.title}", item.probe_png)] if item.probe_png else []
        return stored, [note]
    from merge_backend.engine import MergeEngine
    from merge_backend.pipeline import load_pipeline

    recipe = item.recipe
    dtype = DTYPES["fp32" if device == "cpu" else "fp16"]
    drawn: dict[str, bytes] = {}
    for role in ("model1", "model2"):
        pipe = load_pipeline(Path(recipe.models[role].path), arch=recipe.arch,
                             config_folder=config_folder, device=device, dtype=dtype)
        drawn[role] = draw(pipe)
        if role == "model1" and item.probe_png is None:
            MergeEngine(pipe, recipe).apply(recipe)  # the candidate, in model1's pipeline
            drawn["candidate"] = draw(pipe)
        del pipe
    candidate = item.probe_png if item.probe_png is not None else drawn["candidate"]
    names = {role: Path(recipe.models[role].path).name for role in ("model1", "model2")}
    images = [ReportImage(f"model1: {names['model1']}", drawn["model1"]),
              ReportImage(f"candidate: {item.title}", candidate),
              ReportImage(f"model2: {names['model2']}", drawn["model2"])]
    stored = ["the candidate is the trial's stored probe grid; the parents were drawn for this "
              f"report ({device}) with the same probe set"] if item.probe_png is not None else []
    return images, stored


def _run_one(plan: ExportPlan, out: PlannedOutput, written: dict[tuple[str, str], Path],
             draw: Draw | None, config_folder: Path | None, device: str,
             on_lora: Callable[[PlannedOutput, ExtractResult], None] | None) -> None:
    item, recipe = out.item, out.item.recipe
    if out.format == "checkpoint":
        merge_to_file(recipe, out.paths[0], dtype=plan.dtype, overwrite=plan.overwrite,
                      extra_metadata=_checkpoint_metadata(item), known_sha256=plan.hashes)
        written[(item.stem, "checkpoint")] = out.paths[0]
    elif out.format == "diffusers":
        export_diffusers(recipe, out.paths[0], dtype=plan.dtype, config_folder=config_folder,
                         extra_metadata=_checkpoint_metadata(item),
                         checkpoint=written.get((item.stem, "checkpoint")),
                         replace=plan.overwrite)
    elif out.format == "comfyui":
        extra = {"title": item.title, **{k: str(v) for k, v in item.metadata.items()}}
        workflow = comfy_workflow(recipe, prompt=item.prompt, name=item.stem, extra=extra)
        write_comfy_workflow(workflow, *out.paths, replace=plan.overwrite)
    elif out.format == "mbw":
        atomic_write_text(out.paths[0], mbw_string(recipe, lossy=plan.mbw_lossy) + "\n",
                          plan.overwrite)
    elif out.format == "lora":
        result = _export_lora(plan, item, out.paths[0], written.get((item.stem, "checkpoint")))
        if on_lora:
            on_lora(out, result)
    elif out.format == "report":
        images, notes = report_images(item, draw, config_folder=config_folder, device=device)
        notes += [n for n in plan.notes if n.startswith(f"{item.title}: ")]
        page = render_report(recipe, title=item.title, scores=item.scores, details=item.details,
                             images=images, notes=notes, roles=item.roles, top=item.top)
        atomic_write_text(out.paths[0], page, plan.overwrite)


def _export_lora(plan: ExportPlan, item: ExportItem, path: Path, checkpoint: Path | None
                 ) -> ExtractResult:
    """The merge minus ``plan.lora_base`` as a LoRA (UNet and text encoders), in
    ``plan.lora_format`` with the plan's clamp and the extraction's other defaults."""
    with scratch_folder(path) as tmp:  # beside the LoRA: a full merge, on the output's disk
        merged = checkpoint
        if merged is None:
            merged = tmp / "merged.safetensors"
            merge_to_file(item.recipe, merged, dtype="fp32", known_sha256=plan.hashes)
        return extract_lora(merged, plan.lora_base, path, rank=plan.lora_rank,
                            text_encoder=True, fmt=plan.lora_format,
                            bias_diff=plan.lora_bias_diff, clamp=plan.lora_clamp,
                            overwrite=plan.overwrite)


def run_exports(plan: ExportPlan, *, draw: Draw | None = None, config_folder: Path | None = None,
                device: str = "cpu",
                progress: Callable[[PlannedOutput], None] | None = None,
                on_lora: Callable[[PlannedOutput, ExtractResult], None] | None = None
                ) -> list[Path]:
    """Write every planned output (checkpoints first, so a diffusers folder reuses them);
    ``on_lora`` sees each LoRA's extraction result (its per-block error)."""
    order = sorted(plan.outputs, key=lambda o: list(FORMATS).index(o.format))
    written: dict[tuple[str, str], Path] = {}
    paths: list[Path] = []
    for out in order:
        if progress:
            progress(out)
        _run_one(plan, out, written, draw, config_folder, device, on_lora)
        paths += out.paths
    return paths


def scores_json(scores: Mapping[str, Any] | None) -> str:
    """Scores as the JSON string stored in checkpoint metadata."""
    return json.dumps(dict(scores or {}), sort_keys=True)
