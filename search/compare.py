"""`mergesearch compare RUN --trials 12,57,90`: chosen trials side by side with the references.

One self-contained HTML page (images inlined): each chosen trial's stored, labelled probe grid
with its scores (or, in a person's study, the choices it won and lost) and its ratio chart, beside
the probe grids of model1, model2 and the uniform merge (every block 0.5, as ComfyUI's
ModelMergeSimple at 0.5), which are drawn for the page with the study's probe set. The same
trial columns make the report's "top K" section.

Example:
    >>> page = compare(RunFolder.load("runs/demo"), [12, 57, 90], device="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import optuna

from merge_backend import Recipe
from merge_backend.architectures import ARCHITECTURES, block_names
from merge_backend.export import Column, check_sources, render_comparison

from . import preference
from . import run_folder as rf
from .space import TEXT_ENCODER, block_roles

UNIFORM = 0.5


def study_roles(study: optuna.Study, recipe: Recipe) -> dict[str, str] | None:
    """Each block's role (searched, tied, fixed) from the study's ``params`` attribute."""
    params = study.user_attrs.get("params")
    if not isinstance(params, dict):
        return None
    names = block_names(ARCHITECTURES[recipe.arch], recipe.vocabulary)
    return block_roles(params, names, TEXT_ENCODER, recipe.text_encoder_block)


def trial_scores(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, object]:
    """What a column's table shows: each scorer's mean raw score, the objective value(s), and
    in a person's study the choices the trial won and lost."""
    rows: dict[str, object] = dict(trial.user_attrs.get(rf.ATTR_SCORES) or {})
    if preference.is_preferential(study):
        wins, losses, hidden = preference.tally(study)[trial.number]
        rows.update({"wins": wins, "chosen as worst": losses})
        if hidden:
            rows["on the page"] = "no (hidden)"
    elif trial.values:
        names = study.metric_names or [f"objective {i}" for i in range(len(trial.values))]
        rows.update({f"value: {n}": v for n, v in zip(names, trial.values)})
    return rows


def trial_column(run: rf.RunFolder, study: optuna.Study,
                 trial: optuna.trial.FrozenTrial) -> Column:
    recipe = rf.trial_recipe(trial)
    label = f"trial {trial.number}"
    if trial.user_attrs.get(rf.ATTR_WARM_START):
        label += f" ({trial.user_attrs[rf.ATTR_WARM_START]})"
    return Column(label, run.artifact_bytes(trial.user_attrs.get(rf.ARTIFACT_PROBES)),
                  trial_scores(study, trial), recipe, study_roles(study, recipe),
                  what=f"mergesearch export {shlex.quote(str(run.path.absolute()))} --trial "
                       f"{trial.number} --to checkpoint")


def uniform_recipe(recipe: Recipe) -> Recipe:
    """The merge a person tries first: every UNet block at 0.5, model1's text encoders, no LoRA."""
    ratios = {b: (1.0 if b == recipe.text_encoder_block else UNIFORM) for b in recipe.ratios}
    return recipe.replace(ratios=ratios, clip=None, loras=())


def draw_references(recipe: Recipe, probe_set, *, device: str, config_folder: Path | None
                    ) -> dict[str, bytes]:
    """Labelled probe grids of model1, the uniform merge and model2 (each drawn here)."""
    import torch

    from evaluators import generate
    from merge_backend.engine import MergeEngine
    from merge_backend.pipeline import load_pipeline

    from .artifacts import labelled_grid_png

    dtype = torch.float32 if device == "cpu" else torch.float16
    drawn = {}
    for role in ("model1", "model2"):
        pipe = load_pipeline(Path(recipe.models[role].path), arch=recipe.arch,
                             config_folder=config_folder, device=device, dtype=dtype)
        drawn[role] = labelled_grid_png(generate(pipe, probe_set), role)
        if role == "model1":
            uniform = uniform_recipe(recipe)
            MergeEngine(pipe, uniform, device=device).apply(uniform)
            drawn["uniform"] = labelled_grid_png(generate(pipe, probe_set), "uniform merge")
        del pipe
    return drawn


def reference_columns(recipe: Recipe, drawn: dict[str, bytes]) -> list[Column]:
    names = {role: Path(recipe.models[role].path).name for role in ("model1", "model2")}
    return [Column(f"model1: {names['model1']}", drawn["model1"], what="the first parent alone "
                   "(ratio 1 everywhere)", reference=True),
            Column(f"model2: {names['model2']}", drawn["model2"], what="the second parent alone "
                   "(its own text encoders and VAE)", reference=True),
            Column("uniform merge", drawn["uniform"], recipe=uniform_recipe(recipe),
                   what="every UNet block 0.5, model1's text encoders (ComfyUI ModelMergeSimple "
                        "at 0.5)", reference=True)]


def chosen_trials(study: optuna.Study, numbers: Sequence[int]) -> list[optuna.trial.FrozenTrial]:
    """The COMPLETE trials ``numbers`` names, in that order (RunError naming a bad one)."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    out = []
    for n in numbers:
        if n not in by_number:
            raise rf.RunError(f"--trials: study {study.study_name!r} has no trial {n} (its trials "
                              f"are 0 … {len(by_number) - 1})")
        if by_number[n].state != optuna.trial.TrialState.COMPLETE:
            raise rf.RunError(f"--trials: trial {n} is {by_number[n].state.name}, not COMPLETE")
        out.append(by_number[n])
    return out


def compare(run: rf.RunFolder, numbers: Sequence[int], *, device: str = "cpu",
            config_folder: Path | None = None, probe_set=None,
            sources: Sequence[Path] = ()) -> str:
    """The comparison page of trials ``numbers`` (see the module docstring); ``sources``:
    folders to find moved source models in (``Recipe.with_sources_in``)."""
    from evaluators import ProbeSet

    study = run.study()
    trials = chosen_trials(study, numbers)
    recipe = run.portable(rf.trial_recipe(trials[0])).with_sources_in(sources)
    check_sources(recipe)
    if probe_set is None:
        stored = study.user_attrs.get(rf.STUDY_ATTR_PROBES)
        if not stored:
            raise rf.RunError(f"study {study.study_name!r} stores no probe set; pass --probes")
        probe_set = ProbeSet.model_validate(stored)
    drawn = draw_references(recipe, probe_set, device=device,
                            config_folder=config_folder or run.config_folder())
    references = reference_columns(recipe, drawn)
    columns = [references[0], *(trial_column(run, study, t) for t in trials), *references[1:]]
    details = {"study": study.study_name, "run folder": str(run.path.absolute()),
               "trials": ", ".join(map(str, numbers)), "probes drawn on": device}
    notes = ["Each trial's probe grid is the one stored when it was scored; the parents' and the "
             "uniform merge's were drawn for this page with the study's probe set.",
             "A column's command exports that trial; add --to comfyui for a ComfyUI workflow."]
    return render_comparison(f"{study.study_name}: trials {', '.join(map(str, numbers))}",
                             columns, details=details, notes=notes)
