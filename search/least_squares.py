"""The ``lsq`` sampler: CMA-ES first, then trust-region Gauss-Newton steps on the residual.

A paired ``reference`` score is a least-squares objective: for unit embeddings
``e.r = 1 - |e - r|^2 / 2``, so the study's value falls with ``|R|^2``, where ``R`` holds every
probe's residual ``e_i - r_i`` (``ScoreCard.weighted_residual``; 4 probes x 256 numbers in the
toy world). A sampler that sees one number a trial throws most of that away. This one reads the
residual each trial stores (the system attribute ``residual``, written by ``search.trial`` when
the study's sampler is this one) and, after ``global_trials`` trials of Optuna's CMA-ES:

1. takes the best trial so far and the ``neighbours`` COMPLETE trials nearest it (ratios scaled
   to [0, 1] by their bounds);
2. fits the residual's Jacobian ``J`` to them: ``R_j - R_best ~ J (x_j - x_best)``, weighted
   least squares with weights ``exp(-(d_j / median d)^2)`` and a ridge of 1e-6 of the trace;
3. proposes the point that minimises ``|R_best + J s|`` over ``|s| <= radius`` (through J's
   SVD) inside the bounds (a ratio on a bound that the step would push outwards stays there and
   the step is taken in the others): one evaluation a step, no finite differences.

The radius starts at 0.15 and follows the last step's outcome: x1.5 after a better value (at
most 0.5), halved after a worse one. A fitted Jacobian is only as good as the spread of the
trials it is fitted to, and the steps all lie along the path of descent, so some trials are
probes instead: 0.03 from the best along the direction that the nearest trials (and those
drawing now) cover least, the fit's blind spot. A trial probes
- after every two steps;
- when a step from the same best is still drawing (a worker proposes the next trial while the
  current one draws, so the step's outcome is not known yet: a second step would be a guess);
- when the radius is down to 0.01 (the radius then goes back to 0.05).

The steps find the bottom of the valley the best trial lies in, not another valley. When
``10 + dimensions`` steps and probes in a row bring no better value, CMA-ES takes over again
(its own state, kept in the study, resumes where it stopped) until a trial beats the best; the
steps then go on from that one.

Every step and probe records its radius and the trial it started from (system attribute
``lsq_step``), so the sampler keeps no state of its own: a resumed run or another worker
continues from the study. Parameters that are not plain floats (log scale, stepped,
categorical), studies without residuals, and warm starts go to CMA-ES as before.

Measured in benchmarks/search_quality.py (benchmarks/RESULTS.md, issue 15).

Example:
    >>> sampler = LeastSquaresSampler(seed=0, global_trials=20)
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, CmaEsSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

ATTR_RESIDUAL = "residual"  # a COMPLETE trial's R: float32 little-endian bytes, base64
ATTR_STEP = "lsq_step"  # {"radius", "from" (trial number), "probe"} of a trial this sampler chose

RADIUS, MIN_RADIUS, MAX_RADIUS = 0.15, 0.005, 0.5
GROW, SHRINK = 1.5, 0.5
PROBE, PROBE_EVERY = 0.03, 3
PROBE_BELOW, AFTER_PROBE = 0.01, 0.05
RIDGE = 1e-6
STALL = 10  # steps and probes (plus the dimensions) without a better value: back to CMA-ES


def encode_residual(vector: Any) -> str:
    """``R`` as a system attribute's value (float32, base64: 4/3 x 4 bytes a number)."""
    array = np.ascontiguousarray(np.asarray(vector, dtype="<f4").ravel())
    return base64.b64encode(array.tobytes()).decode("ascii")


def decode_residual(text: str) -> np.ndarray:
    """The float64 vector ``encode_residual`` stored."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


def trust_region_step(jacobian: np.ndarray, residual: np.ndarray, radius: float) -> np.ndarray:
    """The ``s`` with ``|s| <= radius`` that minimises ``|residual + jacobian @ s|``: the
    Gauss-Newton step when it fits, else the Levenberg-Marquardt step whose length is the
    radius (its damping found by bisection on a log scale)."""
    u, sv, vt = np.linalg.svd(jacobian, full_matrices=False)
    g = u.T @ residual
    kept = sv > sv[0] * 1e-10 if sv.size and sv[0] > 0 else np.zeros_like(sv, dtype=bool)
    if not kept.any():
        return np.zeros(jacobian.shape[1])

    def step(damping: float) -> np.ndarray:
        coefficients = np.where(kept, sv * g / np.where(kept, sv**2 + damping, 1.0), 0.0)
        return -(vt.T @ coefficients)

    full = step(0.0)
    if np.linalg.norm(full) <= radius:
        return full
    low, high = 0.0, float(sv[0] ** 2)
    while np.linalg.norm(step(high)) > radius:
        low, high = high, high * 4
    for _ in range(80):
        middle = math.sqrt(max(low, high * 1e-12) * high)
        if np.linalg.norm(step(middle)) > radius:
            low = middle
        else:
            high = middle
    return step(high)


def bounded_step(jacobian: np.ndarray, residual: np.ndarray, radius: float,
                 centre: np.ndarray) -> np.ndarray:
    """``trust_region_step`` from ``centre`` inside [0, 1]: a coordinate at a bound that the
    step would push outwards is held there and the step is taken again in the others (clipping
    it instead bends the step off its course, and the steps stall on the bound)."""
    free = np.ones(centre.shape, dtype=bool)
    step = np.zeros(centre.shape)
    for _ in range(centre.size):
        step = np.zeros(centre.shape)
        if free.any():
            step[free] = trust_region_step(jacobian[:, free], residual, radius)
        outwards = ((centre <= 1e-12) & (step < 0)) | ((centre >= 1 - 1e-12) & (step > 0))
        if not outwards.any():
            break
        free &= ~outwards
    return step


def least_covered(offsets: np.ndarray) -> np.ndarray:
    """The unit direction the rows of ``offsets`` span least (their last right-singular
    vector)."""
    return np.linalg.svd(offsets, full_matrices=True)[2][-1]


class LeastSquaresSampler(BaseSampler):
    """See the module docstring. ``global_trials``: COMPLETE trials with a residual before the
    steps take over (default ``2 x dimensions + 10``: 62 for the 26 MBW blocks);
    ``neighbours``: trials each Jacobian is fitted to (at least dimensions + 2)."""

    def __init__(self, seed: int | None = None, global_trials: int | None = None,
                 neighbours: int = 40) -> None:
        if global_trials is not None and global_trials < 1:
            raise ValueError(f"global_trials must be at least 1, not {global_trials}")
        if neighbours < 2:
            raise ValueError(f"neighbours must be at least 2, not {neighbours}")
        self._seed = seed
        self._global = CmaEsSampler(seed=seed)
        self._global_trials = global_trials
        self._neighbours = neighbours
        self._space = IntersectionSearchSpace()
        self._stepping: dict[int, bool] = {}  # trial number -> whether this trial is a step

    def reseed_rng(self) -> None:
        self._global.reseed_rng()

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._global.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._global.after_trial(study, trial, state, values)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial
                                    ) -> dict[str, BaseDistribution]:
        self._global._search_space = self._space  # one intersection space serves both
        space = {name: dist for name, dist in self._space.calculate(study, use_cache=True).items()
                 if _plain(dist)}
        stepping = bool(space) and self._steps_now(study, trial, len(space))
        self._stepping[trial.number] = stepping
        return space if stepping else self._global.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        if not self._stepping.get(trial.number, False):
            return self._global.sample_relative(study, trial, search_space)
        proposal, step = self._step(study, trial, search_space)
        study._storage.set_trial_system_attr(trial._trial_id, ATTR_STEP, step)
        return proposal

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._global.sample_independent(study, trial, param_name, param_distribution)

    # ------------------------------------------------------------------ the steps
    def _steps_now(self, study: optuna.Study, trial: FrozenTrial, dimensions: int) -> bool:
        if len(study.directions) > 1 or "fixed_params" in trial.system_attrs:
            return False  # several objectives, or a warm start (evaluated as given)
        done = [t for t in study._get_trials(deepcopy=False, use_cache=True) if _scored(t)]
        wanted = self._global_trials or 2 * dimensions + 10
        if len(done) < max(wanted, dimensions + 2):
            return False
        best = _better(study)(done, key=lambda t: (t.value, -t.number)).number
        since = sum(t.number > best and ATTR_STEP in t.system_attrs for t in done)
        return since < STALL + dimensions  # stalled: CMA-ES goes on until a trial beats the best

    def _step(self, study: optuna.Study, trial: FrozenTrial,
              space: dict[str, BaseDistribution]) -> tuple[dict[str, float], dict[str, Any]]:
        names = sorted(space)
        low = np.array([space[n].low for n in names])
        high = np.array([space[n].high for n in names])
        span = np.where(high > low, high - low, 1.0)
        better = _better(study)
        wanted = set(names)
        trials = [t for t in study._get_trials(deepcopy=False, use_cache=True)
                  if t.number != trial.number and t.params.keys() >= wanted]
        raw = np.array([[t.params[n] for n in names] for t in trials])
        x = (raw - low) / span  # every other trial's point, scaled to [0, 1]
        done = [i for i, t in enumerate(trials) if _scored(t)]
        best = better(done, key=lambda i: (trials[i].value, -trials[i].number))
        by_number = {trials[i].number: trials[i] for i in done}

        radius, probe = self._plan(study, trial, trials[best], by_number, better)
        centre = x[best]
        if probe:  # the trials drawing now count: their points are known
            near = [i for i in done if i != best] + [
                i for i, t in enumerate(trials) if t.state == TrialState.RUNNING]
            offsets = x[near] - centre
            nearest = np.argsort(np.linalg.norm(offsets, axis=1), kind="stable")[:len(names)]
            direction = least_covered(offsets[nearest])
            target = centre + PROBE * direction
            if np.any(target < 0) or np.any(target > 1):
                target = centre - PROBE * direction
        else:
            others = [i for i in done if i != best]
            distance = np.linalg.norm(x[others] - centre, axis=1)
            order = np.lexsort(([trials[i].number for i in others], distance))
            nearest = [others[k] for k in order[:max(self._neighbours, len(names) + 2)]]
            residual = decode_residual(trials[best].system_attrs[ATTR_RESIDUAL])
            changes = [(x[i] - centre, decode_residual(trials[i].system_attrs[ATTR_RESIDUAL]))
                       for i in nearest]
            target = centre + bounded_step(_fit(residual, changes), residual, radius, centre)
        proposal = self._unseen(trial, raw, low + span * np.clip(target, 0.0, 1.0), low, high,
                                span * (PROBE if probe else radius))
        return dict(zip(names, proposal.tolist())), {
            "radius": radius, "from": trials[best].number, "probe": probe}

    def _plan(self, study: optuna.Study, trial: FrozenTrial, best: FrozenTrial,
              by_number: dict[int, FrozenTrial], better) -> tuple[float, bool]:
        """(radius, probe): a step's radius, or for a probe the radius of the step after it;
        from the records of the steps finished and drawing (see the module docstring)."""
        records = {t.number: (t, t.system_attrs[ATTR_STEP])
                   for t in study._get_trials(deepcopy=False, use_cache=True)
                   if ATTR_STEP in t.system_attrs and t.number != trial.number
                   and (t.number in by_number or t.state == TrialState.RUNNING)}
        finished = [n for n in sorted(records) if n in by_number]
        radius = RADIUS
        if finished:
            last, record = records[finished[-1]]
            start = by_number.get(record["from"])
            if record["probe"]:
                radius = record["radius"]
            elif start is not None and last.value != start.value \
                    and better(last.value, start.value) == last.value:
                radius = min(record["radius"] * GROW, MAX_RADIUS)
            else:
                radius = max(record["radius"] * SHRINK, MIN_RADIUS)
        if radius <= PROBE_BELOW:
            return AFTER_PROBE, True
        pending = any(t.state == TrialState.RUNNING and not r["probe"] and r["from"] == best.number
                      for t, r in records.values())
        since = 0  # steps since the last probe
        for n in sorted(records, reverse=True):
            if records[n][1]["probe"]:
                break
            since += 1
        return radius, pending or since >= PROBE_EVERY - 1

    def _unseen(self, trial: FrozenTrial, raw: np.ndarray, point: np.ndarray, low: np.ndarray,
                high: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """``point`` (inside the bounds), or, where another trial holds exactly that point (what
        a worker would skip as a duplicate), a point near it: a Gaussian offset of a quarter of
        ``scale``, seeded by the trial."""
        rng = np.random.default_rng([self._seed or 0, trial.number])
        point = np.clip(point, low, high)
        for _ in range(100):
            if not len(raw) or not np.any(np.all(raw == point, axis=1)):
                break
            point = np.clip(point + rng.normal(0.0, 1.0, point.shape) * np.maximum(scale, 1e-9) / 4,
                            low, high)
        return point


def _plain(dist: BaseDistribution) -> bool:
    return isinstance(dist, FloatDistribution) and not dist.log and dist.step is None


def _scored(trial: FrozenTrial) -> bool:
    """A COMPLETE trial with a finite value and its residual: what the steps learn from."""
    return (trial.state == TrialState.COMPLETE and trial.value is not None
            and math.isfinite(trial.value) and ATTR_RESIDUAL in trial.system_attrs)


def _better(study: optuna.Study):
    return max if study.direction == StudyDirection.MAXIMIZE else min


def _fit(residual: np.ndarray, changes: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """J: the weighted least-squares Jacobian of the residual around the best (whose residual
    is ``residual``), from (offset, residual) of its nearest trials."""
    rows = [(o, r) for o, r in changes if r.shape == residual.shape]
    offsets = np.stack([o for o, _ in rows])
    deltas = np.stack([r - residual for _, r in rows])
    distance = np.linalg.norm(offsets, axis=1)
    scale = float(np.median(distance)) or 1.0
    weights = np.exp(-(distance / scale) ** 2)
    gram = offsets.T @ (weights[:, None] * offsets)
    gram += RIDGE * max(float(np.trace(gram)), 1e-12) * np.eye(gram.shape[0])
    jacobian_t = np.linalg.solve(gram, offsets.T @ (weights[:, None] * deltas))
    return jacobian_t.T
