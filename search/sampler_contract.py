"""The contract every sampler passes, built in or a plug-in: a pytest class to subclass.

In a test module of yours::

    from search.sampler_contract import SamplerContract

    class TestMySampler(SamplerContract):
        sampler = "my_package.samplers:MySampler"  # or an entry point's name
        options = {}  # sampler.options of a study config

pytest then runs every ``test_*`` below against it, through ``make_sampler`` (the per-trial
seeding wrapper a study uses) and the study's own worker loop (``search.worker.optimize``) on
a SQLite study (in memory where only the proposals matter), with a cheap objective over a
search space shaped like a study's (block ratios with their own bounds, one past [0, 1], a
multiplier):
- the name resolves and the options are accepted;
- every proposal lies inside its parameter's bounds;
- the same seed replays the same proposals, another seed proposes others;
- a run stopped and resumed by a new process (a new sampler instance) proposes what one
  uninterrupted run does: the sampler keeps its state in the study (with ``propose_ahead``
  off: proposed ahead, the first trial after a resume sees one more finished trial than the
  uninterrupted run's did);
- the worker loop reaches its target of COMPLETE trials with a warm start queued first
  (evaluated as given) and a failed trial on the way; with ``objective: multi`` too, where the
  sampler serves multi-objective studies.

A single-objective trial also stores its residual, as a study with a least-squares scorer does
(``search.least_squares``: the value is ``-|R|^2``), so samplers that read residuals (``lsq``)
are checked on their own steps.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import optuna
import pytest

from . import run_folder as rf
from . import warm_starts
from .least_squares import ATTR_RESIDUAL, encode_residual
from .samplers import make_sampler, option_problems, sampler_entry
from .trial import TrialFailed
from .worker import optimize

# (name, low, high): block ratios as a study names them (tied blocks joined by "+"), one
# extrapolated, and an add-difference multiplier.
SPACE: tuple[tuple[str, float, float], ...] = (
    ("IN00", 0.0, 1.0), ("IN01+IN02", 0.2, 0.6), ("M00", -0.5, 1.5), ("OUT00", 0.0, 1.0),
    ("OUT01", 0.9, 1.0), ("multiplier", 0.5, 1.5))
HIDDEN = {"IN00": 0.3, "IN01+IN02": 0.5, "M00": 0.9, "OUT00": 0.1, "OUT01": 0.95,
          "multiplier": 1.2}


def objective(trial: optuna.Trial, ctx: Any = None) -> float | list[float]:
    """A cheap stand-in for a probe's score: near a hidden point is better."""
    params = {name: trial.suggest_float(name, low, high) for name, low, high in SPACE}
    distance = sum((params[n] - HIDDEN[n]) ** 2 for n in HIDDEN)
    if len(trial.study.directions) > 1:
        return [-distance, -abs(params["multiplier"] - 1.0)]
    return -distance


class SamplerContract:
    """Subclass with ``sampler`` (and ``options``). See the module docstring."""

    sampler: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    trials: ClassVar[int] = 14

    def _study(self, storage: Any, name: str, seed: int = 0, objectives: int = 1
               ) -> optuna.Study:
        """A study on ``storage``: a folder (the SQLite study a run folder holds) or an
        Optuna storage object (in memory: quicker, for the tests of proposals alone)."""
        if isinstance(storage, Path):
            storage.mkdir(parents=True, exist_ok=True)
            storage = rf.open_storage(rf.default_storage(storage))
        return optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                   sampler=make_sampler(self.sampler, seed, self.options),
                                   directions=["maximize"] * objectives)

    def _run(self, study: optuna.Study, trials: int, fail_at: int | None = None,
             ahead: bool = True):
        def run(trial: optuna.Trial, ctx: Any) -> float | list[float]:
            value = objective(trial)
            if trial.number == fail_at:
                raise TrialFailed("a candidate that cannot be scored")
            if not isinstance(value, list):  # -|R|^2 for R = sqrt(2) (params - HIDDEN)
                residual = [math.sqrt(2) * (trial.params[n] - HIDDEN[n]) for n in HIDDEN]
                study._storage.set_trial_system_attr(trial._trial_id, ATTR_RESIDUAL,
                                                     encode_residual(residual))
            return value

        kind = "multi" if len(study.directions) > 1 else "weighted"
        ctx = SimpleNamespace(cfg=SimpleNamespace(trials=trials, timeout=None, objective=kind,
                                                  propose_ahead=ahead))
        return optimize(study, ctx, trials=trials, log=lambda message: None, run=run,
                        propose=objective)

    @staticmethod
    def _proposals(study: optuna.Study) -> list[dict[str, float]]:
        return [t.params for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]

    # ------------------------------------------------------------------ the contract
    def test_name_resolves_and_options_are_accepted(self):
        entry = sampler_entry(self.sampler)
        assert callable(entry.cls)
        assert option_problems(self.sampler, self.options) == []

    def test_every_proposal_lies_inside_its_bounds(self):
        study = self._study(optuna.storages.InMemoryStorage(), "bounds", seed=1)
        self._run(study, self.trials)
        trials = study.get_trials(deepcopy=False)
        assert len(trials) >= self.trials
        for trial in trials:
            assert set(trial.params) == {name for name, _, _ in SPACE}
            for name, low, high in SPACE:
                value = trial.params[name]
                assert math.isfinite(value) and low <= value <= high, (trial.number, name, value)

    def test_the_same_seed_replays_and_another_seed_differs(self):
        runs = []
        for seed in (5, 5, 6):
            study = self._study(optuna.storages.InMemoryStorage(), "seeded", seed=seed)
            self._run(study, self.trials)
            runs.append(self._proposals(study))
        assert runs[0] == runs[1]
        assert runs[0] != runs[2]

    def test_a_resumed_run_proposes_what_one_uninterrupted_run_does(self):
        whole = self._study(optuna.storages.InMemoryStorage(), "resume", seed=3)
        self._run(whole, self.trials, ahead=False)
        storage = optuna.storages.InMemoryStorage()
        self._run(self._study(storage, "resume", seed=3), self.trials // 2, ahead=False)
        second = self._study(storage, "resume", seed=3)  # a new process's sampler
        self._run(second, self.trials, ahead=False)
        assert self._proposals(second) == self._proposals(whole)

    def test_the_worker_loop_reaches_its_target(self, tmp_path):
        study = self._study(tmp_path, "worker", seed=2)
        warm = {name: HIDDEN[name] for name, _, _ in SPACE}
        warm_starts.enqueue(study, "hidden", warm)
        result = self._run(study, 6, fail_at=2)
        states = [t.state for t in sorted(study.get_trials(), key=lambda t: t.number)]
        assert result.completed == 6 and states.count(optuna.trial.TrialState.COMPLETE) == 6
        assert states[2] == optuna.trial.TrialState.FAIL
        assert len(states) == 7  # nothing asked for past the target (left WAITING)
        assert self._proposals(study)[0] == warm  # the warm start, as given

    def test_multi_objective_studies_where_it_serves_them(self, tmp_path):
        if not sampler_entry(self.sampler).multi_objective:
            pytest.skip(f"{self.sampler} is single-objective (its entry says so)")
        study = self._study(tmp_path, "multi", seed=4, objectives=2)
        result = self._run(study, 6)
        assert result.completed == 6
        assert study.best_trials and all(len(t.values) == 2 for t in study.best_trials)
