"""`mergesearch export SOURCE --to FORMAT …`: a scored merge as files other tools read.

SOURCE is a run folder (pick trials with --trial N, --best or --pareto K), a Recipe .json,
or a checkpoint mergesearch wrote (its embedded Recipe). Every check runs before anything is
written: a study with no completed trial, a missing source or a source whose sha256 changed
since the study ran stop the export with a message and exit status 1. A run folder's sources
are found from any working directory (runs store absolute paths; older ones are resolved
from the folder the run was started in).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from merge_backend import Recipe, RecipeError, recipe_from_checkpoint
from merge_backend.checkpoint import CheckpointError, open_checkpoint
from merge_backend.export import (
    FORMATS,
    ComfyPrompt,
    ExportError,
    ExportItem,
    PlannedOutput,
    plan_exports,
    run_exports,
    scores_json,
)
from merge_backend.lora import ExtractResult

from .cli_lora import add_clamp_options
from .cli_options import add_drawing_options, check_count, output_path, source_folders
from .compare import study_roles, trial_column
from .run_folder import (
    ARTIFACT_PROBES,
    ATTR_SCORE,
    ATTR_SCORES,
    STUDY_ATTR_PROBES,
    RunError,
    RunFolder,
    pick_trials,
    ranked,
    trial_recipe,
)

META_STUDY, META_TRIAL, META_SCORES = "mergesearch.study", "mergesearch.trial", "mergesearch.scores"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    formats = "\n".join(textwrap.fill(f"{name:<11} {' + '.join(f.names).format(stem='STEM')}: "
                                       f"{f.what}", 90, initial_indent="  ",
                                       subsequent_indent=" " * 14)
                         for name, f in FORMATS.items())
    p = sub.add_parser(
        "export", help="write a merge as a checkpoint, diffusers folder, ComfyUI workflow, "
                       "SuperMerger string, LoRA or HTML report",
        description=f"{__doc__}\nformats (--to; STEM is e.g. mystudy-trial7):\n{formats}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path,
                   help="a run folder, a Recipe .json, or a checkpoint mergesearch wrote")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--trial", type=int, metavar="N", help="export trial number N")
    pick.add_argument("--best", action="store_true", help="export the best trial (default)")
    pick.add_argument("--pareto", type=int, metavar="K",
                      help="export the first K trials of the Pareto front")
    p.add_argument("--to", dest="formats", action="append", choices=list(FORMATS),
                   required=True, metavar="FORMAT",
                   help=f"what to write, one of {', '.join(FORMATS)} (see above); repeat for "
                        "several")
    p.add_argument("-o", "--output", type=output_path,
                   help="folder to write into (default RUN/exports, or exports/ beside the "
                        "source); with one trial and one format, a file name with the format's "
                        "suffix (.safetensors, .json, .txt, .html; lora: .safetensors)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="checkpoint and diffusers weights (default fp16)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_drawing_options(p, "a probe-set YAML for the report images and the workflow's prompt",
                        "checkpoints", "the report draws images")
    p.add_argument("--mbw-lossy", action="store_true",
                   help="write the SuperMerger string even where ComfyUI sliders that share one "
                        "SuperMerger weight differ (noted in the report)")
    p.add_argument("--base", type=Path,
                   help="--to lora: the checkpoint the LoRA is relative to (required with lora)")
    p.add_argument("--rank", type=int, default=32,
                   help="--to lora: rank (8-32 for a style, 64+ for a solid difference)")
    p.add_argument("--lora-format", choices=("kohya", "comfyui"), default="kohya",
                   help="--to lora: kohya (default) or ComfyUI's LoraSave layout")
    p.add_argument("--bias-diff", action=argparse.BooleanOptionalAction, default=None,
                   help="--to lora: store norm / bias differences (default: on for comfyui, "
                        "off for kohya)")
    add_clamp_options(p, prefix="--to lora: ")
    p.add_argument("--top", type=int, default=5, metavar="K",
                   help="--to report from a run folder: show the study's best K trials side by "
                        "side at the end (0: none)")
    p.add_argument("--quiet", action="store_true", help="print only the written paths")
    p.set_defaults(func=run_export)


# ---------------------------------------------------------------------------- sources


@dataclass
class Loaded:
    items: list[ExportItem]
    default_output: Path
    probe_set: dict[str, Any] | None = None
    protected: list[Path] = field(default_factory=list)
    config_folder: Path | None = None  # a run's own, for drawing the report's parents


def _stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "merge"


def _trial_item(run: RunFolder, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                prompt: ComfyPrompt | None, top: tuple = ()) -> ExportItem:
    recipe = run.portable(trial_recipe(trial))
    scores = dict(trial.user_attrs.get(ATTR_SCORES) or {})
    if ATTR_SCORE in trial.user_attrs:
        scores[ATTR_SCORE] = trial.user_attrs[ATTR_SCORE]
    values = trial.values or []
    details = {"study": study.study_name, "trial": trial.number,
               "objective values": ", ".join(f"{v:.6g}" for v in values),
               "directions": ", ".join(d.name.lower() for d in study.directions)}
    metadata = {META_STUDY: study.study_name, META_TRIAL: str(trial.number),
                META_SCORES: scores_json(scores)}
    return ExportItem(recipe, f"{_stem(study.study_name)}-trial{trial.number}",
                      f"{study.study_name} trial {trial.number}", metadata, scores, details,
                      prompt, run.artifact_bytes(trial.user_attrs.get(ARTIFACT_PROBES)),
                      study_roles(study, recipe), top)


def _load_run(path: Path, args: argparse.Namespace) -> Loaded:
    run = RunFolder.load(path)
    study = run.study()
    trials = pick_trials(study, number=args.trial, pareto=args.pareto)
    if not trials:
        raise RunError(f"study {study.study_name!r} has no Pareto-optimal trial to export")
    probe_set = _probe_set(args, study.user_attrs.get(STUDY_ATTR_PROBES))
    prompt = ComfyPrompt.from_probe_set(probe_set) if probe_set else None
    top = tuple(trial_column(run, study, t) for t in ranked(study)[:args.top]) \
        if "report" in args.formats else ()
    items = [_trial_item(run, study, t, prompt, top) for t in trials]
    return Loaded(items, run.exports, probe_set, run.own_files(),
                  config_folder=run.config_folder())


def _load_file(path: Path, args: argparse.Namespace) -> Loaded:
    if args.trial is not None or args.pareto is not None:
        raise ExportError(f"{path}: --trial and --pareto pick trials of a run folder; "
                          "a recipe or checkpoint holds one merge")
    metadata: Mapping[str, str] = {}
    try:
        if path.suffix.lower() == ".json":
            recipe = Recipe.from_json(path.read_text(encoding="utf-8"))
        else:
            metadata = open_checkpoint(path).metadata
            recipe = recipe_from_checkpoint(path)
    except (RecipeError, CheckpointError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not a Recipe file or a checkpoint mergesearch wrote ({exc})"
                          ) from None
    kept = {k: metadata[k] for k in (META_STUDY, META_TRIAL, META_SCORES) if k in metadata}
    scores = json.loads(kept[META_SCORES]) if META_SCORES in kept else None
    probe_set = _probe_set(args, None)
    prompt = ComfyPrompt.from_probe_set(probe_set) if probe_set else None
    item = ExportItem(recipe, _stem(path.stem), path.name, kept, scores,
                      {k.split(".")[-1]: v for k, v in kept.items() if k != META_SCORES}, prompt)
    return Loaded([item], path.parent / "exports", probe_set, [path])


def load_source(args: argparse.Namespace) -> Loaded:
    """The ExportItems SOURCE names (see the module docstring)."""
    path: Path = args.source
    if path.is_dir():  # RunFolder.load says what a folder lacks
        return _load_run(path, args)
    if not path.exists():
        raise ExportError(f"{path}: no such run folder, recipe or checkpoint")
    return _load_file(path, args)


# ---------------------------------------------------------------------------- probes


def _probe_set(args: argparse.Namespace, stored: Mapping[str, Any] | None) -> dict | None:
    """The probe-set config dict: --probes, else the study's. Validated (which imports the
    evaluators, slow) only when the report will draw with it."""
    if args.probes is None and not stored:
        return None
    if args.probes is None and "report" not in args.formats:
        return dict(stored) if isinstance(stored.get("prompts"), list) else None
    from evaluators import ProbeSet

    if args.probes is not None:
        return ProbeSet.from_yaml(args.probes).model_dump()
    try:
        return ProbeSet.model_validate(dict(stored)).model_dump()
    except ValueError as exc:  # the export itself does not need the probes
        print(f"note: the study's probe set is unusable here ({exc}); pass --probes",
              file=sys.stderr)
        return None


def _drawer(probe_set: Mapping[str, Any]):
    from evaluators import ProbeSet, generate

    from .artifacts import labelled_grid_png

    probes = ProbeSet.model_validate(dict(probe_set))

    def draw(pipe: Any) -> bytes:
        return labelled_grid_png(generate(pipe, probes))

    return draw


def pick_device(args: argparse.Namespace) -> str:
    """--device, else cuda where there is one, else cpu (ValueError: not here)."""
    from merge_backend.devices import usable_device

    return str(usable_device(args.device, "--device"))


# ---------------------------------------------------------------------------- command


def run_export(args: argparse.Namespace) -> int:
    check_count("--top", args.top, least=0)
    check_count("--pareto", args.pareto)
    folders = source_folders(args)
    loaded = load_source(args)
    loaded.items = [replace(item, recipe=item.recipe.with_sources_in(folders))
                    for item in loaded.items]
    output = args.output if args.output is not None else loaded.default_output
    plan = plan_exports(loaded.items, args.formats, output, dtype=args.dtype,
                        overwrite=args.overwrite, mbw_lossy=args.mbw_lossy,
                        protected=loaded.protected, lora_base=args.base, lora_rank=args.rank,
                        lora_format=args.lora_format, lora_bias_diff=args.bias_diff,
                        lora_clamp=args.clamp)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)

    def progress(out: PlannedOutput) -> None:
        if not args.quiet:
            print(f"  {out.item.title}: {out.format} -> {out.paths[0]}", file=sys.stderr)

    def lora_done(out: PlannedOutput, result: ExtractResult) -> None:
        for note in result.notes:
            print(f"note: {out.item.title}: {note}", file=sys.stderr)
        if not args.quiet:  # stdout stays the JSON list of written files
            print(result.report(), file=sys.stderr)

    draw = _drawer(loaded.probe_set) if loaded.probe_set and "report" in args.formats else None
    paths = run_exports(plan, draw=draw, config_folder=args.config_folder or loaded.config_folder,
                        device=pick_device(args), progress=progress, on_lora=lora_done)
    print(json.dumps({"written": [str(p) for p in paths]}, indent=2))
    return 0
