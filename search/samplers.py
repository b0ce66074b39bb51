"""Samplers by name: the config says `sampler: {name, seed, options}`.

``name`` is a built-in (``SAMPLERS``: tpe, cmaes, gp, qmc, random, lsq, nsga2,
preferential_gp), another package's
``mergesearch.samplers`` entry point, or ``package.module:Class``: any Optuna sampler class
whose constructor takes ``seed``, or a ``SamplerEntry``. ``search/sampler_contract.py`` is the
test every sampler passes.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.samplers import BaseSampler
from optuna.search_space import IntersectionSearchSpace

from merge_backend.plugins import (
    PluginError,
    entry_points,
    import_object,
    is_import_path,
    load_entry_point,
)

from .least_squares import LeastSquaresSampler

ENTRY_POINT_GROUP = "mergesearch.samplers"


class SamplerError(ValueError):
    """A sampler name that names no sampler, or a plug-in that is not one."""


SCORES, CHOICES, NOTHING = "scores", "choices", "nothing"
PREFERENCE_EXTRA = "pip install 'mergesearch[preference]'"


@dataclass(frozen=True)
class SamplerEntry:
    """A kind of sampler: ``cls(seed=…, **options)`` builds it (an Optuna ``BaseSampler``;
    ``cls`` may be ``"module:Class"``, imported when first used).

    ``defaults``: options set unless the config sets them. ``per_trial_seed``: rebuilt for every
    trial with the trial's seed (False: one instance for the run, as QMC's one sequence needs).
    ``multi_objective``: whether it can serve ``objective: multi``. ``learns_from``: ``scores``
    (the scorers' values), ``choices`` (a person's, in preference and mixed studies) or
    ``nothing`` (serves either). ``carried``: attributes a rebuilt instance takes over from
    the one before (caches that depend on the study, not on the seed: the GP's fitted kernel
    parameters, which start the next fit). ``search_space``: the attribute where the sampler
    keeps Optuna's ``IntersectionSearchSpace``; it is carried too (it is brought up to date
    trial by trial: a fresh one goes over every trial again) and reads the study through
    Optuna's per-trial cache, the read the sampler makes anyway (see ``TrialCachedSpace``).
    ``residuals``: the sampler reads each COMPLETE trial's scorer residual (the system attribute
    ``search.least_squares.ATTR_RESIDUAL``, stored only for such samplers); a study using it
    needs one objective scorer that gives residuals (``ScorerConfig.has_residuals``).
    """

    cls: Callable[..., BaseSampler] | str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    per_trial_seed: bool = True
    multi_objective: bool = True
    learns_from: str = SCORES
    carried: tuple[str, ...] = ()
    search_space: str | None = None
    residuals: bool = False

    def sampler_class(self) -> Callable[..., BaseSampler]:
        """The class (ValueError naming the install for a lazily imported one that is missing)."""
        if not isinstance(self.cls, str):
            return self.cls
        module, _, attr = self.cls.partition(":")
        try:
            with warnings.catch_warnings():  # botorch's and torch.jit's import-time notices
                warnings.simplefilter("ignore")
                return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise SamplerError(f"sampler {self.cls} needs botorch ({exc}); "
                               f"{PREFERENCE_EXTRA}") from None


class GPBoundedSampler(optuna.samplers.GPSampler):
    """Optuna's GPSampler with its acquisition search bounded: ``n_preliminary_samples``
    quasi-random candidates (Optuna: 2048) of which the best ``n_local_search`` (10) are
    refined by L-BFGS-B. Each proposal then costs a bounded number of acquisition evaluations
    whatever the study's length (the GP fit still grows with the trials it is fit on).

    Example:
        >>> sampler = GPBoundedSampler(seed=0, n_preliminary_samples=256, n_local_search=4)
    """

    def __init__(self, *, seed: int | None = None, independent_sampler: BaseSampler | None = None,
                 n_startup_trials: int = 10, deterministic_objective: bool = False,
                 warn_independent_sampling: bool = True, n_preliminary_samples: int = 512,
                 n_local_search: int = 4):
        super().__init__(seed=seed, independent_sampler=independent_sampler,
                         n_startup_trials=n_startup_trials,
                         deterministic_objective=deterministic_objective,
                         warn_independent_sampling=warn_independent_sampling)
        self._n_preliminary_samples = n_preliminary_samples
        self._n_local_search = n_local_search


# Our defaults for TPE: multivariate, and constant liar so parallel workers spread out.
TPE_DEFAULTS = {"multivariate": True, "constant_liar": True, "n_startup_trials": 10}
SAMPLERS: dict[str, SamplerEntry] = {
    "tpe": SamplerEntry(optuna.samplers.TPESampler, TPE_DEFAULTS, search_space="_search_space"),
    "cmaes": SamplerEntry(optuna.samplers.CmaEsSampler, multi_objective=False,
                          search_space="_search_space"),
    "gp": SamplerEntry(GPBoundedSampler, multi_objective=False,
                       carried=("_gprs_cache_list", "_constraints_gprs_cache_list"),
                       search_space="_intersection_search_space"),
    # scrambled, so that its seed matters (Optuna's default scramble=False ignores the seed)
    "qmc": SamplerEntry(optuna.samplers.QMCSampler, {"scramble": True}, per_trial_seed=False),
    "random": SamplerEntry(optuna.samplers.RandomSampler, learns_from=NOTHING),
    # CMA-ES, then Gauss-Newton steps fitted to the paired reference scorer's residuals
    "lsq": SamplerEntry(LeastSquaresSampler, multi_objective=False, search_space="_space",
                        residuals=True),
    "nsga2": SamplerEntry(optuna.samplers.NSGAIISampler),
    # learns from a person's choices (optuna-dashboard's preferential optimisation); imported
    # only when used, since it brings in botorch (seconds)
    "preferential_gp": SamplerEntry(
        "optuna_dashboard.preferential.samplers.gp:PreferentialGPSampler", learns_from=CHOICES),
}


def register_sampler(name: str, entry: SamplerEntry | type[BaseSampler]) -> None:
    """Make ``name`` usable as ``sampler.name`` (a SamplerEntry, or a sampler class)."""
    SAMPLERS[name] = _entry(entry, name)


def sampler_entry(name: str) -> SamplerEntry:
    """The sampler ``name`` names: a built-in, another package's ``mergesearch.samplers`` entry
    point, or ``package.module:Class``; SamplerError says what is wrong."""
    if not isinstance(name, str):
        raise SamplerError(f"{name!r} is not a sampler name")
    if name in SAMPLERS:
        return SAMPLERS[name]
    try:
        obj = import_object(name) if is_import_path(name) \
            else load_entry_point(ENTRY_POINT_GROUP, name)
    except PluginError as exc:
        raise SamplerError(str(exc)) from None
    if obj is None:
        near = difflib.get_close_matches(name, known_samplers(), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise SamplerError(f"unknown sampler {name!r}{hint}; known: "
                           f"{', '.join(known_samplers())}, or package.module:Class")
    return _entry(obj, name)


def _entry(obj: object, name: str) -> SamplerEntry:
    if isinstance(obj, SamplerEntry):
        entry = obj
    elif isinstance(obj, type) and issubclass(obj, BaseSampler):
        entry = SamplerEntry(obj)
    else:
        raise SamplerError(f"sampler {name!r} names {obj!r}, which is neither an Optuna "
                           "sampler class (optuna.samplers.BaseSampler) nor a SamplerEntry")
    cls = entry.cls
    if not isinstance(cls, str) and "seed" not in inspect.signature(cls).parameters:
        raise SamplerError(f"sampler {name!r}: {getattr(cls, '__name__', cls)} takes no `seed` "
                           "argument; mergesearch seeds every trial's draws with it")
    return entry


def known_samplers() -> list[str]:
    """The built-in samplers and every installed ``mergesearch.samplers`` entry point."""
    return [*SAMPLERS, *sorted(n for n in entry_points(ENTRY_POINT_GROUP) if n not in SAMPLERS)]


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s random draws in a study whose sampler seed is ``seed``."""
    return int(np.random.SeedSequence([seed % 2**32, number]).generate_state(1)[0])


class TrialCachedSpace(IntersectionSearchSpace):
    """Optuna's intersection search space, reading the study's trials through the per-trial
    cache (``Study._get_trials(use_cache=True)``: one read per asked trial, shared with the
    sampler's own read of the history) as TPE already asks it to. CMA-ES and the GP ask for a
    fresh read: one more query of the storage per trial, 3-4 ms on SQLite
    (benchmarks/trial_overhead.py)."""

    def calculate(self, study: optuna.Study, use_cache: bool = False):
        return super().calculate(study, use_cache=True)


class TrialSeededSampler(BaseSampler):
    """A sampler rebuilt for every trial with the seed ``trial_seed(seed, trial.number)``.

    Optuna samplers keep their state in the study (history, CMA-ES generations, NSGA-II
    populations), so a fresh instance per trial proposes what the long-lived one would, except
    that its random numbers depend on the trial, not on how many trials this process has run.
    """

    def __init__(self, build: Callable[[int], BaseSampler], seed: int,
                 carried: tuple[str, ...] = (), search_space: str | None = None):
        self._build = build
        self._seed = seed
        self._carried = carried + ((search_space,) if search_space else ())
        self._inner = build(seed)
        if search_space and hasattr(self._inner, search_space):
            own = getattr(self._inner, search_space)
            setattr(self._inner, search_space, TrialCachedSpace(own._include_pruned))

    @property
    def inner(self) -> BaseSampler:
        return self._inner

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        previous = self._inner
        self._inner = self._build(trial_seed(self._seed, trial.number))
        for name in self._carried:
            if hasattr(previous, name):
                setattr(self._inner, name, getattr(previous, name))
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
    """One instance for the run, not reseeded per trial: QMC (see the module docstring), and
    any sampler whose entry says ``per_trial_seed=False``."""

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner.before_trial(study, trial)


def make_sampler(name: str, seed: int, options: Mapping[str, Any]) -> TrialSeededSampler:
    """The sampler ``name`` names (tpe: multivariate, constant liar for parallel workers),
    wrapped so each trial's draws are seeded with (seed, trial number). ``options``
    go to its constructor over the entry's defaults (see ``option_problems``)."""
    entry = sampler_entry(name)
    cls = entry.sampler_class()
    kwargs = {**entry.defaults, **options}

    def build(trial_seed_: int) -> BaseSampler:
        with warnings.catch_warnings():  # QMC and some options announce they are experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)  # the preferential GP's torch.jit
            return cls(seed=trial_seed_, **kwargs)

    if not entry.per_trial_seed:
        return QmcSampler(build, seed)
    return TrialSeededSampler(build, seed, entry.carried, entry.search_space)


def option_problems(name: str, options: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``sampler.options`` for sampler ``name`` ("KEY: why" each)."""
    try:
        entry = sampler_entry(name)
    except SamplerError:
        return []  # sampler.name reports it
    try:
        cls = entry.sampler_class()
    except SamplerError as exc:
        return [str(exc)]
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "seed")]
    title = getattr(cls, "__name__", name)
    problems = []
    for key in options:
        if key == "seed":
            problems.append("seed: set sampler.seed instead")
        elif key not in accepted:
            near = difflib.get_close_matches(key, accepted, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            problems.append(f"{key}: {title} has no option {key!r}{hint}; its "
                            f"options: {', '.join(accepted)}")
    if problems:
        return problems
    try:
        make_sampler(name, 0, options)
    except (TypeError, ValueError) as exc:
        problems.append(f"{title} refuses them: {exc}")
    return problems
