"""One trial, top to bottom: params -> Recipe -> engine apply -> probes -> scores -> value(s)."""

from __future__ import annotations

import math
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch

from evaluators import (
    ProbeSet,
    ScoreNorm,
    Scorer,
    combine,
    generate,
    objective_vector,
    score_images,
)
from merge_backend.engine import MergeEngine
from merge_backend.export import ratio_chart_svg

from . import run_folder as rf
from .artifacts import labelled_grid_png, upload_pictures
from .config import PERSON, StudyConfig
from .least_squares import ATTR_RESIDUAL, encode_residual
from .preference import ATTR_CANDIDATE
from .space import SearchSpace
from .storage_writes import TrialWrites

ATTR_DUPLICATE = "duplicate_of"
ATTR_CHEAP = "cheap_score"  # the value on the cheap probes (fidelity)
ATTR_CHEAP_BAR = "cheap_bar"  # the cheap score it had to reach to be drawn in full


class TrialFailed(RuntimeError):
    """A candidate that cannot be scored (NaN images, out of memory); the study goes on."""


class DuplicateTrial(Exception):
    """The sampler proposed the parameters of a trial already evaluated (or being evaluated):
    the trial is recorded PRUNED with ``duplicate_of`` and costs no budget (the worker's
    proposal finds these; a trial function may raise it too)."""


@dataclass
class StudyContext:
    """Everything a trial needs, built once per worker process by ``study.prepare``."""

    cfg: StudyConfig
    space: SearchSpace
    engine: MergeEngine
    pipe: Any
    probes: ProbeSet
    scorers: list[Scorer]
    norms: dict[str, ScoreNorm]
    run: rf.RunFolder
    artifact_store: Any
    extra_attrs: dict[str, Any] = field(default_factory=dict)
    # fidelity: the cheap score the trial being drawn must reach to be drawn in full (set per
    # trial by the worker from the study's cheap scores; None: drawn in full regardless)
    cheap_bar: float | None = None
    # the scorer whose residual each trial stores for the sampler (StudyConfig.residual_scorer)
    residual_scorer: str | None = None


@dataclass
class Drawn:
    """A candidate drawn and scored whose records are still to be written: the worker calls
    ``record()`` on its storage thread (``search.lane``), then stores ``value`` (or PRUNED when
    ``pruned``: its cheap probes scored below the bar)."""

    value: float | list[float] | None
    record: Callable[[], None]
    pruned: bool = False


def run_trial(trial: optuna.Trial, ctx: StudyContext) -> Drawn:
    """One candidate: its parameters (proposed before, by the worker's lane) -> Recipe ->
    engine apply -> probes -> scores; what it stores comes back as ``Drawn.record``."""
    clock = _Clock()
    try:
        params = ctx.space.suggest(trial)  # the proposal's values: no sampler, no storage here
        recipe = ctx.space.recipe(params)
        clock.lap("suggest")
        ctx.engine.apply(recipe)
        clock.lap("apply")
        cheap, bar = _cheap_value(ctx, clock), ctx.cheap_bar
        if cheap is not None and bar is not None and cheap < bar:
            return _pruned(trial, ctx, cheap, clock)
        images = generate(ctx.pipe, ctx.probes, device=ctx.engine.device)
        clock.lap("generate")
        if not torch.isfinite(images.images).all():
            raise TrialFailed("the candidate drew NaN or infinite images")
        card = score_images(images, ctx.scorers)
        value = _value(ctx, card)
        clock.lap("score")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise

    def record() -> None:
        """Every record of the trial in one write: Recipe, scores, pictures, note, timings."""
        clock.restart()
        writes = TrialWrites(trial.study, trial._trial_id)
        writes.user_attr(rf.ATTR_RECIPE, recipe.to_dict())
        writes.user_attr(rf.ATTR_SCORES, card.means())
        if ctx.scorers:
            writes.user_attr(rf.ATTR_SCORE, value)
        ids = upload_pictures(trial, ctx.artifact_store, [
            (rf.ARTIFACT_PROBES, "probes.png", labelled_grid_png(images, _title(trial)),
             "image/png"),
            (rf.ARTIFACT_RATIOS, "ratios.svg",
             ratio_chart_svg(recipe, ctx.space.roles()).encode(), "image/svg+xml")], writes)
        write_note(trial, ctx, card.means(), value, writes)
        if ctx.cfg.objective in PERSON:  # the picture the dashboard's choice page shows
            writes.user_attr(ATTR_CANDIDATE, ids[rf.ARTIFACT_PROBES])
        if cheap is not None:
            writes.user_attr(ATTR_CHEAP, cheap)
            writes.user_attr(ATTR_CHEAP_BAR, bar)
        if ctx.residual_scorer is not None:
            writes.system_attr(ATTR_RESIDUAL,
                               encode_residual(card.weighted_residual(ctx.residual_scorer)))
        clock.lap("bookkeeping")
        writes.user_attr(rf.ATTR_TIMINGS, clock.laps)
        writes.commit()

    # a person's study: the value means nothing (choices are stored in the study)
    return Drawn(0.0 if ctx.cfg.objective in PERSON else value, record)


def _cheap_value(ctx: StudyContext, clock: _Clock) -> float | None:
    """The candidate's value on the cheap probes (the probes with ``fidelity.steps``), or None
    without ``fidelity``."""
    fidelity = getattr(ctx.cfg, "fidelity", None)
    if fidelity is None:
        return None
    images = generate(ctx.pipe, ctx.probes.model_copy(update={"steps": fidelity.steps}),
                      device=ctx.engine.device)
    if not torch.isfinite(images.images).all():
        raise TrialFailed("the candidate drew NaN or infinite images (cheap probes)")
    value = _value(ctx, score_images(images, ctx.scorers))
    clock.lap("cheap")
    return float(value)


def _pruned(trial: optuna.Trial, ctx: StudyContext, cheap: float, clock: _Clock) -> Drawn:
    """A candidate whose cheap score is below the bar: PRUNED with both numbers, not drawn in
    full (its cheap images are not kept)."""
    bar = ctx.cheap_bar

    def record() -> None:
        # the cheap score as the trial's intermediate value: TPE learns from a pruned trial
        # through it (ranked below every COMPLETE one); the attributes say it in words
        trial.study._storage.set_trial_intermediate_value(trial._trial_id, 0, cheap)
        writes = TrialWrites(trial.study, trial._trial_id)
        writes.user_attr(ATTR_CHEAP, cheap)
        writes.user_attr(ATTR_CHEAP_BAR, bar)
        writes.user_attr(rf.ATTR_TIMINGS, clock.laps)
        writes.commit()

    return Drawn(None, record, pruned=True)


def _title(trial: optuna.Trial) -> str:
    warm = trial.user_attrs.get(rf.ATTR_WARM_START)
    return f"trial {trial.number}" + (f" ({warm})" if warm else "")


def _value(ctx: StudyContext, card) -> float | list[float]:
    if ctx.cfg.objective == "multi":
        value: float | list[float] = objective_vector(card, ctx.norms)
    elif ctx.scorers:
        value = combine(card, ctx.norms)
    else:
        return 0.0
    if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
        raise TrialFailed(f"the scorers gave a non-finite value {value}")
    return value


def write_note(trial: optuna.Trial, ctx: StudyContext, scores: dict[str, float],
               value: float | list[float], writes: TrialWrites) -> None:
    """The trial's dashboard note (its scores and the commands that export or compare it),
    into ``writes``."""
    run = shlex.quote(str(ctx.run.path))
    lines = [f"### Trial {trial.number}", ""]
    if scores:
        lines += ["| scorer | mean raw score |", "|---|---|",
                  *(f"| {name} | {v:.6g} |" for name, v in scores.items())]
        combined = value if isinstance(value, list) else [value]
        lines += ["", f"objective value: **{', '.join(f'{v:.6g}' for v in combined)}**", ""]
    lines += ["Export this merge (checkpoint + ComfyUI workflow):", "",
              f"    mergesearch export {run} --trial {trial.number} --to checkpoint --to comfyui",
              "", "Compare it with the parents and the uniform merge:", "",
              f"    mergesearch compare {run} --trials {trial.number}"]
    note_attrs(writes, "\n".join(lines))


# a command of ``write_note``'s: the run folder (as shlex quotes it) is group 2
_NOTE_COMMAND = re.compile(r"(mergesearch (?:export|compare) )((?:'[^']*'|\"'\"|[^\s'\"])+)"
                           r"( --trials? \d)")


def note_in_folder(body: str, folder: Path) -> str:
    """A note ``write_note`` wrote, its commands naming ``folder``: where the run folder is now
    (a copied or moved folder's notes name the folder the trials ran in)."""
    run = shlex.quote(str(folder))
    return _NOTE_COMMAND.sub(lambda m: m.group(1) + run + m.group(3), body)


def note_attrs(writes: TrialWrites, body: str) -> None:
    """A new trial's first note, as optuna-dashboard's ``save_note`` stores it (study system
    attributes: version 1 and the body in parts), without ``save_note``'s two reads of every
    study system attribute, which hold every trial's note and so grow with the study."""
    from optuna_dashboard._note import note_ver_key, split_body

    writes.study_system_attr(note_ver_key(writes.trial_id), 1)
    for key, part in split_body(body, writes.trial_id).items():
        writes.study_system_attr(key, part)


def evaluated_twin(others: list[optuna.trial.FrozenTrial], trial: optuna.Trial,
                   params: dict[str, float]) -> int | None:
    """The number of a COMPLETE trial, or of an earlier RUNNING one, among ``others`` (the
    study's COMPLETE and RUNNING trials) with exactly ``params``."""
    for other in others:
        if other.number != trial.number and other.params == params and (
                other.state == optuna.trial.TrialState.COMPLETE or other.number < trial.number):
            return other.number
    return None


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def restart(self) -> None:
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 6)
        self._last = now
