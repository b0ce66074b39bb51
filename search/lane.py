"""The worker's storage lane: every storage write of a worker, in order, on one thread beside
the draw.

A trial's storage work (asking for a trial, the sampler's proposal, its parameters, the
pictures and attributes, telling its value) costs tens of milliseconds that grow with the
study, while the accelerator would wait. The worker hands that work to the lane, a single
background thread that runs each job in the order given, so the writes stay ordered exactly
as a serial worker makes them. While trial N draws, the lane stores trial N-1 (``finish``:
records, then its value) and then proposes trial N+1 (``propose``), so the proposal sees
every trial before N and trial N itself as running (its parameters are stored when it starts,
``start``); a sampler with constant liar (TPE's default here) spreads the two apart.

What is stored is the same as a serial worker stores, and nothing is reported before it is:
the worker's callbacks (the progress line) run for a trial once ``finish`` has told it, so a
worker killed at any moment loses no trial it reported. A trial proposed ahead but not started
when the worker stops goes back to the queue (WAITING, no parameters: the next ``ask`` draws
anew); a killed worker's is found stale like its running trial (``search.liveness``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from . import run_folder as rf
from .liveness import Heartbeat, mark_worker
from .storage_writes import TrialWrites, deferred_suggests
from .trial import ATTR_CHEAP, ATTR_DUPLICATE, DuplicateTrial, evaluated_twin
from .warm_starts import requeue, warm_start_of

INTERRUPTED = "interrupted"
Propose = Callable[[optuna.Trial, Any], object]


def propose_params(trial: optuna.Trial, ctx) -> None:
    """The default proposal: every parameter of the study's search space."""
    ctx.space.suggest(trial)


@dataclass
class Proposal:
    """A trial asked for and its parameters proposed (held in the trial object, stored by
    ``start``); ``twin``: an evaluated trial with the same parameters; ``error``: why the
    proposal failed (the trial is then recorded FAIL)."""

    trial: optuna.Trial
    writes: TrialWrites
    twin: int | None = None
    error: BaseException | None = None
    cheap_bar: float | None = None  # fidelity: the cheap score to reach (None: draw in full)


class Lane:
    """One background thread running storage jobs in the order submitted."""

    def __init__(self, study: optuna.Study, heartbeat: Heartbeat, screening=None):
        self.study = study
        self.heartbeat = heartbeat
        self.screening = screening  # search.screening.Screening, or None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mergesearch-storage")
        # trials short of the target at the last proposal's read, less those other workers
        # may ask before the next one (one per trial they hold): while above 0, the target
        # cannot be reached before the next ask, and no read is needed to know it
        self._slack: int | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ jobs
    def propose(self, ctx, target: int, propose: Propose) -> Proposal | None:
        """Ask for a trial and propose its parameters; None when the COMPLETE and running
        trials reach ``target`` already (none is asked for; the study is read for it only
        when the last proposal left no slack), or reach it once it is asked for (another worker
        asked at the same moment: it goes back to the queue)."""
        running = (TrialState.COMPLETE, TrialState.RUNNING)
        if (self._slack is None or self._slack <= 0) and \
                len(self.study.get_trials(deepcopy=False, states=running)) >= target:
            return None
        if self.screening is not None:
            self.screening.before_proposal(self.study)
        with warnings.catch_warnings():
            # Optuna suggests study.optimize for heartbeats; the worker beats itself
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = self.study.ask()
        mark_worker(self.study, trial)
        self.heartbeat.hold(trial._trial_id)
        try:
            with deferred_suggests(trial) as writes:
                propose(trial, ctx)
        except Exception as exc:  # noqa: BLE001 - a sampler's error fails this trial only
            return Proposal(trial, TrialWrites(self.study, trial._trial_id), error=exc)
        # the study as read since this ask (the sampler's read, Optuna's per-trial cache;
        # one read here for a sampler that reads nothing): every trial asked before this one,
        # which is all ``surplus`` counts; one list for both checks
        others = self.study._get_trials(deepcopy=False, states=running, use_cache=True)
        mine = self.heartbeat.held()
        self._slack = target - len(others) - sum(
            1 for t in others if t.state == TrialState.RUNNING and t._trial_id not in mine)
        if surplus(others, trial, target):
            self.hand_back(trial)  # its parameters were never stored: the next ask draws anew
            return None
        twin = evaluated_twin(others, trial, trial.params)
        if twin is None:
            twin = queued_twin(self.study, others, trial)
        return Proposal(trial, writes, twin,
                        cheap_bar=cheap_bar(self.study, getattr(ctx.cfg, "fidelity", None)))

    def start(self, proposal: Proposal) -> None:
        """The trial starts drawing: its parameters are stored (one write)."""
        proposal.writes.commit()

    def hand_back(self, trial: optuna.Trial) -> None:
        """A trial never started goes back to the queue (WAITING): the next ask takes it."""
        self.heartbeat.release(trial._trial_id)
        self.study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)

    def finish(self, trial: optuna.Trial, value: Any, record: Callable[[], None] | None,
               error: BaseException | None, pruned: bool = False) -> optuna.trial.FrozenTrial:
        """Store the trial's records, then tell its value (or FAIL / PRUNED with the reason;
        ``pruned``: its cheap probes scored below the bar)."""
        state = TrialState.PRUNED if pruned else TrialState.COMPLETE
        try:
            if error is None and record is not None:
                record()
        except Exception as exc:  # noqa: BLE001 - recorded as the trial's failure
            error = exc
        if isinstance(error, DuplicateTrial):
            state, error = TrialState.PRUNED, None
        elif isinstance(error, KeyboardInterrupt):
            state = TrialState.FAIL
            self.study._storage.set_trial_user_attr(trial._trial_id, rf.ATTR_FAIL, INTERRUPTED)
            requeue(self.study, self.study._storage.get_trial(trial._trial_id))
        elif error is not None:
            state = TrialState.FAIL
            reason = f"{type(error).__name__}: {error}"[:2000]
            self.study._storage.set_trial_user_attr(trial._trial_id, rf.ATTR_FAIL, reason)
        try:
            return _tell(self.study, trial, state, value)
        finally:
            self.heartbeat.release(trial._trial_id)

    def duplicate(self, proposal: Proposal) -> optuna.trial.FrozenTrial:
        """A proposal of an evaluated point: stored PRUNED with ``duplicate_of``, not drawn."""
        proposal.writes.user_attr(ATTR_DUPLICATE, proposal.twin)
        proposal.writes.commit()
        return self.finish(proposal.trial, None, None,
                           DuplicateTrial(f"same parameters as trial {proposal.twin}"))


def queued_twin(study: optuna.Study, others: list[optuna.trial.FrozenTrial],
                trial: optuna.Trial) -> int | None:
    """For a warm start queued twice, the number of the copy to draw, when it is not ``trial``
    (``others``: the study's COMPLETE and RUNNING trials, ``trial`` among them).

    Workers starting together can each queue the warm starts before either has marked them
    queued (measured: two PostgreSQL workers drew model1 as trials 0 and 1). Both copies are
    trials from the moment they are queued, so every worker agrees without a lock: the
    lowest-numbered copy that has not failed is drawn, any other is a duplicate of it. A copy
    proposed by another worker has no stored parameters yet, so ``evaluated_twin`` cannot see it.
    Only a warm start reads the study again (its copies may still be WAITING).
    """
    own = next((t for t in others if t.number == trial.number), None) \
        or study._storage.get_trial(trial._trial_id)
    start = warm_start_of(own)
    if start is None:
        return None
    copies = [t.number for t in study.get_trials(deepcopy=False)
              if t.state != TrialState.FAIL and warm_start_of(t) == start]
    first = min(copies, default=trial.number)
    return first if first != trial.number else None


def surplus(others: list[optuna.trial.FrozenTrial], trial: optuna.Trial, target: int) -> bool:
    """Whether COMPLETE trials plus those running ahead of ``trial`` (lower numbers) among
    ``others`` (the study's COMPLETE and RUNNING trials) already reach the target."""
    ahead = [t for t in others if t.state == TrialState.COMPLETE or t.number < trial.number]
    return len(ahead) >= target


def cheap_bar(study: optuna.Study, fidelity) -> float | None:
    """The cheap score a new candidate must reach to be drawn in full: the ``1 - keep``
    quantile of every cheap score in the study (None for the first ``warmup`` candidates, or
    without ``fidelity``)."""
    if fidelity is None:
        return None
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    scores = [t.user_attrs[ATTR_CHEAP] for t in study.get_trials(deepcopy=False, states=states)
              if ATTR_CHEAP in t.user_attrs]
    if len(scores) < fidelity.warmup:
        return None
    return float(np.quantile(scores, 1.0 - fidelity.keep))


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState,
          value) -> optuna.trial.FrozenTrial:
    try:
        if state == TrialState.COMPLETE:
            return study.tell(trial, value)
        return study.tell(trial, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        # another worker marked it FAIL while it ran (its heartbeat was late); its result is lost
        return study._storage.get_trial(trial._trial_id)
