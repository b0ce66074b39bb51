"""One trial, top to bottom: params -> Recipe -> engine apply -> probes -> scores -> value(s)."""

from __future__ import annotations

import os
import socket
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

WORKER = f"{socket.gethostname()}:{os.getpid()}"


class TrialFailed(RuntimeError):
    """A candidate that cannot be scored (NaN images, out of memory); the study goes on."""


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
    """The objective Optuna calls. Failures are recorded with their reason, then re-raised."""
    clock = _Clock()
    trial.set_user_attr(rf.ATTR_WORKER, WORKER)
    try:
        params = ctx.space.suggest(trial)
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
        clock.lap("score")
        trial.set_user_attr(rf.ATTR_RECIPE, recipe.to_dict())
        trial.set_user_attr(rf.ATTR_SCORES, card.means())
        trial.set_user_attr(rf.ATTR_SCORE, value)
        _upload_pictures(trial, ctx, images.grid(), recipe.ratios)
        clock.lap("bookkeeping")
        trial.set_user_attr(rf.ATTR_TIMINGS, clock.laps)
        return value
    except Exception as exc:
        trial.set_user_attr(rf.ATTR_FAIL, f"{type(exc).__name__}: {exc}"[:2000])
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        raise


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
