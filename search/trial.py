"""One trial, top to bottom: params -> Recipe -> engine apply -> probes -> scores -> value(s)."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import upload_artifact

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

from . import run_folder as rf
from .artifacts import grid_png, ratio_chart_png
from .config import StudyConfig
from .space import SearchSpace

ATTR_DUPLICATE = "duplicate_of"


class TrialFailed(RuntimeError):
    """A candidate that cannot be scored (NaN images, out of memory); the study goes on."""


class DuplicateTrial(Exception):
    """The sampler proposed the parameters of a trial already evaluated (or being evaluated):
    the trial is recorded PRUNED with ``duplicate_of`` and costs no budget."""


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


def run_trial(trial: optuna.Trial, ctx: StudyContext) -> float | list[float]:
    """One candidate, scored. Failures are recorded with their reason, then re-raised."""
    clock = _Clock()
    try:
        params = ctx.space.suggest(trial)
        twin = evaluated_twin(trial, params)
        if twin is not None:  # never pay twice for one point
            trial.set_user_attr(ATTR_DUPLICATE, twin)
            raise DuplicateTrial(f"same parameters as trial {twin}")
        recipe = ctx.space.recipe(params)
        clock.lap("suggest")
        ctx.engine.apply(recipe)
        clock.lap("apply")
        images = generate(ctx.pipe, ctx.probes)
        clock.lap("generate")
        if not torch.isfinite(images.images).all():
            raise TrialFailed("the candidate drew NaN or infinite images")
        card = score_images(images, ctx.scorers)
        if ctx.cfg.objective == "multi":
            value: float | list[float] = objective_vector(card, ctx.norms)
        else:
            value = combine(card, ctx.norms)
        if not all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise TrialFailed(f"the scorers gave a non-finite value {value}")
        clock.lap("score")
        trial.set_user_attr(rf.ATTR_RECIPE, recipe.to_dict())
        trial.set_user_attr(rf.ATTR_SCORES, card.means())
        trial.set_user_attr(rf.ATTR_SCORE, value)
        _upload_pictures(trial, ctx, images.grid(), recipe.ratios)
        clock.lap("bookkeeping")
        trial.set_user_attr(rf.ATTR_TIMINGS, clock.laps)
        return value
    except DuplicateTrial:
        raise
    except Exception as exc:
        trial.set_user_attr(rf.ATTR_FAIL, f"{type(exc).__name__}: {exc}"[:2000])
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        raise


def evaluated_twin(trial: optuna.Trial, params: dict[str, float]) -> int | None:
    """The number of a COMPLETE trial, or of an earlier RUNNING one, with exactly ``params``."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    for other in trial.study.get_trials(deepcopy=False, states=states):
        if other.number != trial.number and other.params == params and (
                other.state == optuna.trial.TrialState.COMPLETE or other.number < trial.number):
            return other.number
    return None


def _upload_pictures(trial: optuna.Trial, ctx: StudyContext, grid: torch.Tensor,
                     ratios: dict[str, float]) -> None:
    pictures = {rf.ARTIFACT_PROBES: ("probes.png", grid_png(grid)),
                rf.ARTIFACT_RATIOS: ("ratios.png", ratio_chart_png(ratios))}
    with tempfile.TemporaryDirectory(dir=ctx.run.path) as tmp:
        for attr, (name, data) in pictures.items():
            path = Path(tmp) / f"trial{trial.number}_{name}"
            path.write_bytes(data)
            artifact_id = upload_artifact(artifact_store=ctx.artifact_store, file_path=str(path),
                                          study_or_trial=trial, mimetype="image/png")
            trial.set_user_attr(attr, artifact_id)


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 6)
        self._last = now
