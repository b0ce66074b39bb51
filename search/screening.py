"""Block screening: find the blocks that barely move the score, fix them, search the rest.

With ``screening: {after: N, threshold: t}`` in the study config (N by default twice the
searched parameters plus 10, ``min_trials``), once the study holds N COMPLETE trials the worker
estimates each searched parameter's influence from the first N of them: an additive model, per
parameter a quadratic in its ratio (``a·u + b·u²``, least squares over all parameters at once),
and the influence is how far that curve moves the score across the parameter's bounds. Every
parameter whose influence is below ``t`` times the strongest one's is fixed at the best
trial's value from then on (Optuna's ``PartialFixedSampler`` around the study's sampler); the
sampler spends the rest of the budget on the others. The decision is stored in the study (user
attribute ``screening``), so resumed runs and other workers apply the same one, and it is said
in the run log and in the dashboard's study note, with every parameter's influence.

Screening suits samplers that model each parameter (tpe, gp, qmc, random); CMA-ES starts a new
search distribution on the smaller space.

Example:
    >>> found = influences([[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5]], [0, 1, 0, 1, 0.5],
    ...                    [(0, 1), (0, 1)])
    >>> [round(v, 3) for v in found]  # the score is the first ratio: range 1; the second: 0
    [1.0, 0.0]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import optuna

from . import run_folder as rf
from .liveness import stale_trials

ATTR_SCREENING = "screening"
_GRID = np.linspace(0.0, 1.0, 21)


def influences(points: Sequence[Sequence[float]], values: Sequence[float],
               bounds: Sequence[tuple[float, float]], ridge: float = 1e-4) -> list[float]:
    """Each parameter's influence on ``values`` (score units): the range over its bounds of
    its term ``a·u + b·u²`` (u the ratio scaled to [-1/2, 1/2]: nearly uncorrelated features)
    in a ridge fit of an additive quadratic model to ``points`` (one row of parameter values
    per trial)."""
    x = np.asarray(points, dtype=float)
    low = np.array([b[0] for b in bounds])
    span = np.array([b[1] - b[0] for b in bounds])
    u = (x - low) / span - 0.5
    features = np.concatenate([u, u * u], axis=1)
    centred = features - features.mean(axis=0)
    y = np.asarray(values, dtype=float)
    y = y - y.mean()
    gram = centred.T @ centred
    # a touch of ridge, scaled to the features' own size, only to keep the solve stable: more
    # shrinkage leaks the strong parameters' effect into weak ones that happen to correlate
    # with them in the sample (screening needs more trials than coefficients: min_trials)
    lam = ridge * max(np.trace(gram) / gram.shape[0], 1e-12)
    coef = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), centred.T @ y)
    n = x.shape[1]
    grid = _GRID - 0.5
    curves = np.outer(coef[:n], grid) + np.outer(coef[n:], grid ** 2)
    return [float(v) for v in curves.max(axis=1) - curves.min(axis=1)]


def min_trials(parameters: int) -> int:
    """The fewest trials screening estimates ``parameters`` influences from: more than the
    model's 2 coefficients per parameter, with room to spare."""
    return 2 * parameters + 10


def decide(trials: Sequence[optuna.trial.FrozenTrial], space, threshold: float,
           best: optuna.trial.FrozenTrial) -> dict:
    """The screening decision from ``trials`` (the study's first COMPLETE ones): every
    parameter's influence, and the fixed ones with the best trial's values."""
    params = space.all_params()
    found = influences([[t.params[p.name] for p in params] for t in trials],
                       [t.value for t in trials], [(p.low, p.high) for p in params])
    strongest = max(found)
    fixed = {p.name: best.params[p.name] for p, v in zip(params, found)
             if v < threshold * strongest}
    return {"after": len(trials), "threshold": threshold, "best_trial": best.number,
            "influence": {p.name: float(v) for p, v in zip(params, found)}, "fixed": fixed}


def describe(decision: dict) -> str:
    """The run log's line."""
    fixed, influence = decision["fixed"], decision["influence"]
    searched = [name for name in influence if name not in fixed]
    strongest = max(influence, key=influence.get)
    if not fixed:
        return (f"screening after {decision['after']} trials: every parameter moves the score "
                f"by at least {decision['threshold']:g} x the strongest ({strongest}, "
                f"{influence[strongest]:.4g}); all {len(searched)} stay searched")
    return (f"screening after {decision['after']} trials: {len(fixed)} of {len(influence)} "
            f"parameters move the score by less than {decision['threshold']:g} x the strongest "
            f"({strongest}, {influence[strongest]:.4g}) and are fixed at trial "
            f"{decision['best_trial']}'s values: "
            + ", ".join(f"{name}={value:.3f}" for name, value in fixed.items())
            + f"; searching {len(searched)}: {', '.join(searched)}")


def note(decision: dict) -> str:
    """The dashboard's study note: the decision and every parameter's influence."""
    fixed, influence = decision["fixed"], decision["influence"]
    lines = ["### Block screening", "", describe(decision) + ".", "",
             "| parameter | influence (score range over its bounds) | |", "|---|---|---|"]
    for name, value in sorted(influence.items(), key=lambda kv: -kv[1]):
        state = f"fixed at {fixed[name]:.3f}" if name in fixed else "searched"
        lines.append(f"| {name} | {value:.4g} | {state} |")
    return "\n".join(lines)


class Screening:
    """The worker's screening step, run on its storage lane before each proposal."""

    def __init__(self, after: int | None, threshold: float, space,
                 log: Callable[[str], None]):
        self.after = after or min_trials(len(space.all_params()))
        self.threshold, self.space, self.log = threshold, space, log
        self.applied = False

    def before_proposal(self, study: optuna.Study) -> None:
        if self.applied:
            return
        decision = study.user_attrs.get(ATTR_SCREENING)
        if decision is None:
            done = sorted(rf.completed(study), key=lambda t: t.number)[:self.after]
            if len(done) < self.after or unsettled(study, done[-1].number):
                return
            best = max(done, key=lambda t: (t.value, -t.number))
            decision = decide(done, self.space, self.threshold, best)
            decision["from_trial"] = len(study.get_trials(deepcopy=False))  # the next one
            study.set_user_attr(ATTR_SCREENING, decision)
            _save_study_note(study, note(decision))
        self.log(describe(decision))
        if decision["fixed"]:
            with warnings.catch_warnings():  # PartialFixedSampler is "experimental"
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.sampler = optuna.samplers.PartialFixedSampler(decision["fixed"],
                                                                    study.sampler)
        self.applied = True


def unsettled(study: optuna.Study, last: int) -> bool:
    """Whether a trial numbered below ``last`` may still complete (WAITING, or RUNNING and not
    stale): until none can, the first ``after`` COMPLETE trials by number may still change, and
    two workers deciding at once could decide from different trials."""
    states = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    open_ = [t for t in study.get_trials(deepcopy=False, states=states) if t.number < last]
    if not open_:
        return False
    stale = {t.number for t in stale_trials(study)}
    return any(t.number not in stale for t in open_)


def _save_study_note(study: optuna.Study, body: str) -> None:
    from optuna_dashboard import save_note

    save_note(study, body)
