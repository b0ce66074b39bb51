"""A run folder: where a study's config, storage, artifacts and exports live.

    RUN/
      run.json        study name, storage URL, artifact folder (written when the study starts)
      config.yaml     the resolved study config
      study.db        SQLite storage (default; any Optuna RDB URL may be used instead)
      artifacts/      optuna FileSystemArtifactStore: probe grids, ratio charts
      exports/        what `mergesearch export` writes by default

Every trial that completes carries, as user attributes:
  ``recipe``   the Recipe it scored (Recipe.to_dict())
  ``scores``   {scorer name: raw value}, ``score`` the combined value
  ``timings``  {phase: seconds}
  ``worker``   host:pid of the worker process that ran it
  ``artifact:probes`` / ``artifact:ratios``  artifact ids of the probe grid and ratio chart
so anything downstream (export, dashboard, notebook) needs only the storage and this folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import optuna

from merge_backend import Recipe

RUN_FILE = "run.json"
ATTR_RECIPE = "recipe"
ATTR_SCORES = "scores"
ATTR_SCORE = "score"
ATTR_TIMINGS = "timings"
ATTR_FAIL = "fail_reason"
ATTR_WORKER = "worker"  # host:pid of the process that ran the trial
ARTIFACT_PROBES = "artifact:probes"
ARTIFACT_RATIOS = "artifact:ratios"
STUDY_ATTR_PROBES = "probe_set"
STUDY_ATTR_SCORERS = "scorers"


class RunError(ValueError):
    """A run folder or study that cannot be used; the message says what is missing."""


@dataclass(frozen=True)
class RunFolder:
    path: Path
    study_name: str
    storage: str

    @property
    def artifact_dir(self) -> Path:
        return self.path / "artifacts"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def exports(self) -> Path:
        return self.path / "exports"

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / RUN_FILE).write_text(json.dumps(
            {"study_name": self.study_name, "storage": self.storage}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> RunFolder:
        path = Path(path)
        meta = path / RUN_FILE
        if not meta.exists():
            raise RunError(f"{path}: not a mergesearch run folder (no {RUN_FILE}); pass the "
                           "output folder of `mergesearch run`")
        data = json.loads(meta.read_text())
        return cls(path, data["study_name"], data["storage"])

    def study(self) -> optuna.Study:
        try:
            return optuna.load_study(study_name=self.study_name, storage=self.storage)
        except KeyError:
            raise RunError(f"{self.path}: storage {self.storage} has no study "
                           f"{self.study_name!r}") from None

    def artifact_store(self):
        from optuna.artifacts import FileSystemArtifactStore

        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        return FileSystemArtifactStore(str(self.artifact_dir))


def default_storage(path: Path) -> str:
    return f"sqlite:///{(Path(path) / 'study.db').resolve()}"


def trial_recipe(trial: optuna.trial.FrozenTrial) -> Recipe:
    if ATTR_RECIPE not in trial.user_attrs:
        raise RunError(f"trial {trial.number} carries no recipe")
    return Recipe.from_dict(trial.user_attrs[ATTR_RECIPE])


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE]


def pick_trials(study: optuna.Study, *, number: int | None = None, best: bool = False,
                pareto: int | None = None) -> list[optuna.trial.FrozenTrial]:
    """The trials an export names: one by number, the best, or the first K of the Pareto front."""
    done = completed(study)
    if not done:
        raise RunError(f"study {study.study_name!r} has no completed trial yet; nothing to export")
    if number is not None:
        match = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not match:
            raise RunError(f"study {study.study_name!r} has no trial {number}")
        if match[0].state != optuna.trial.TrialState.COMPLETE:
            raise RunError(f"trial {number} is {match[0].state.name}, not COMPLETE")
        return match
    if pareto is not None:
        return list(study.best_trials)[:pareto]
    if len(study.directions) > 1:
        return list(study.best_trials)[:1]
    return [study.best_trial]
