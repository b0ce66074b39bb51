"""Samplers by name: the config says `sampler: {name, seed, options}`.

``preferential_gp`` is optuna-dashboard's PreferentialGPSampler: it learns from a person's
choices (preference and mixed studies) and needs the ``preference`` extra (botorch).

Every trial is a new point. Random draws (TPE's and CMA-ES's start-up trials, random search,
GP's and NSGA-II's candidates) come from a generator seeded with ``(sampler.seed, trial
number)``: one worker running a study from start to end is reproducible from ``sampler.seed``,
while a resumed run or another worker, whose trials carry other numbers, draws other points
(one seed per process would replay the same start-up points in every process). QMC is not
reseeded: it walks one low-discrepancy sequence whose position the study itself stores, so
workers and resumes continue it.

Example:
    >>> sampler = make_sampler("tpe", 0, {"n_startup_trials": 5})
    >>> type(sampler.inner).__name__
    'TPESampler'
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optuna
from optuna.samplers import BaseSampler

SAMPLER_CLASSES: dict[str, Callable[..., BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "gp": optuna.samplers.GPSampler,
    "qmc": optuna.samplers.QMCSampler,
    "random": optuna.samplers.RandomSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}
# Learns from a person's choices (optuna-dashboard's preferential optimisation); imported only
# when named, since it brings in botorch (seconds).
LAZY_SAMPLERS = {"preferential_gp": "optuna_dashboard.preferential.samplers.gp:PreferentialGPSampler"}
PREFERENCE_EXTRA = "pip install 'mergesearch[preference]'"


def sampler_class(name: str) -> Callable[..., BaseSampler]:
    """The sampler class of ``name`` (ValueError naming the install for a missing extra)."""
    if name in SAMPLER_CLASSES:
        return SAMPLER_CLASSES[name]
    module, _, attr = LAZY_SAMPLERS[name].partition(":")
    try:
        with warnings.catch_warnings():  # botorch's and torch.jit's import-time notices
            warnings.simplefilter("ignore")
            return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ValueError(f"sampler {name} needs botorch ({exc}); {PREFERENCE_EXTRA}") from None
# Our defaults for TPE: multivariate, and constant liar so parallel workers spread out.
TPE_DEFAULTS = {"multivariate": True, "constant_liar": True, "n_startup_trials": 10}


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s random draws in a study whose sampler seed is ``seed``."""
    return int(np.random.SeedSequence([seed % 2**32, number]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """A sampler rebuilt for every trial with the seed ``trial_seed(seed, trial.number)``.

    Optuna samplers keep their state in the study (history, CMA-ES generations, NSGA-II
    populations), so a fresh instance per trial proposes what the long-lived one would, except
    that its random numbers depend on the trial, not on how many trials this process has run.
    """

    def __init__(self, build: Callable[[int], BaseSampler], seed: int):
        self._build = build
        self._seed = seed
        self._inner = build(seed)

    @property
    def inner(self) -> BaseSampler:
        return self._inner

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner = self._build(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        with warnings.catch_warnings():
            # the preferential GP draws at random until the first choice is stored, and says
            # so with this warning on every parameter of those trials
            warnings.filterwarnings("ignore", message="Dynamic search space detected")
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


class QmcSampler(TrialSeededSampler):
    """QMC as configured, one instance for the run (see the module docstring)."""

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner.before_trial(study, trial)


def _options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(options)
    if name == "tpe":
        for key, value in TPE_DEFAULTS.items():
            out.setdefault(key, value)
    return out


def make_sampler(name: str, seed: int, options: Mapping[str, Any]) -> TrialSeededSampler:
    """tpe (default: multivariate, constant liar for parallel workers), cmaes, gp, qmc, random,
    nsga2. ``options`` go to the sampler's constructor unchanged (see ``option_problems``)."""
    cls = sampler_class(name)
    kwargs = _options(name, options)

    def build(trial_seed_: int) -> BaseSampler:
        with warnings.catch_warnings():  # QMC and some options announce they are experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)  # the preferential GP's torch.jit
            return cls(seed=trial_seed_, **kwargs)

    if name == "qmc":
        return QmcSampler(build, seed)
    return TrialSeededSampler(build, seed)


def option_problems(name: str, options: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``sampler.options`` for sampler ``name`` ("KEY: why" each)."""
    if name not in SAMPLER_CLASSES and name not in LAZY_SAMPLERS:
        return []
    try:
        cls = sampler_class(name)
    except ValueError as exc:
        return [str(exc)]
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "seed")]
    problems = []
    for key in options:
        if key == "seed":
            problems.append("seed: set sampler.seed instead")
        elif key not in accepted:
            near = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            problems.append(f"{key}: {cls.__name__} has no option {key!r}{hint}; its "
                            f"options: {', '.join(accepted)}")
    if problems:
        return problems
    try:
        make_sampler(name, 0, options)
    except (TypeError, ValueError) as exc:
        problems.append(f"{cls.__name__} refuses them: {exc}")
    return problems
