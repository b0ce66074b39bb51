"""One worker's trial loop: run trials until the study holds ``trials`` COMPLETE ones.

The budget counts COMPLETE trials only: a failed, interrupted or skipped trial costs none of
it. Several workers on one storage reach exactly the target together: a worker starts a trial
only while the COMPLETE trials plus those running ahead of it (lower numbers) are short of the
target; otherwise it hands its new trial back to the queue (WAITING) and waits, in case a
running trial fails. Stale trials (a killed worker's) are failed when the loop starts, while
it waits and when it stops (``search.liveness``).

In a ``preference`` or ``mixed`` study (``search.preference``) the worker draws a new candidate
only while fewer than ``preference.candidates`` are on the dashboard's page, and otherwise waits
for the person's choice; in a mixed study each candidate is the scorers' best of a round of
``preference.pool`` trials.

Storage work runs on the worker's lane (``search.lane``), one background thread, in order: while
a trial draws, the lane stores the one before and proposes the next, so an accelerator never
waits on the sampler or the database. Callbacks (the progress line) run in the worker's thread
once a trial is stored.

Ctrl-C (SIGINT) records the running trial as FAIL with the reason ``interrupted`` (the trial
proposed ahead goes back to the queue unstarted) and stops;
``WorkerResult.interrupted`` then tells the command to exit with status 130. A worker stops by
itself after ``FAILS_IN_A_ROW`` failed trials in a row (after a failure it proposes in turn, so
it stops before drawing another), or ``DUPLICATES_IN_A_ROW`` proposals of points already
evaluated.
"""

from __future__ import annotations

import gc
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from . import preference
from . import run_folder as rf
from .config import PERSON
from .lane import Lane, Proposal, Propose, propose_params
from .liveness import Heartbeat, fail_stale_trials
from .screening import Screening
from .trial import ATTR_DUPLICATE, Drawn, DuplicateTrial, StudyContext, TrialFailed, run_trial

FAILS_IN_A_ROW = 5
DUPLICATES_IN_A_ROW = 20
# A failure of one candidate (out of memory, NaN images, a scorer's error) is recorded and the
# study goes on; anything else is a bug and stops the worker (after recording the trial).
CAUGHT = (TrialFailed, RuntimeError, ValueError, OSError)
Log = Callable[[str], None]
Callback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]
RunTrial = Callable[[optuna.Trial, StudyContext], "Drawn | float | list[float]"]


@dataclass
class WorkerResult:
    """What one call of ``optimize`` did, for the command's message and exit status."""

    target: int
    completed: int = 0  # COMPLETE trials in the study when the worker stopped
    completed_here: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)  # (trial, reason), this worker
    interrupted: bool = False
    stopped: str | None = None  # why the worker stopped short of the target, if it did

    @property
    def all_failed(self) -> bool:
        return bool(self.failures) and self.completed_here == 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def _tally(study: optuna.Study) -> tuple[int, int]:
    """(COMPLETE, RUNNING) trials, from one read of the storage."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    return complete, len(trials) - complete


@contextmanager
def _held_interrupts() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM while the storage is written (ask, tell): a Ctrl-C or a
    ``kill`` never leaves a trial half-recorded. Yields the list of signals held; the caller
    acts on them afterwards (as on Ctrl-C: ``cli.main`` makes SIGTERM one). A signal the
    process ignores stays ignored."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield pending
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_line(study: optuna.Study, target: int) -> str:
    running = count(study, TrialState.RUNNING)
    return (f"waiting: {count(study, TrialState.COMPLETE)} of {target} trials are complete and "
            f"{running} running in other workers; another trial starts here only if one of "
            "them fails")


def optimize(study: optuna.Study, ctx: StudyContext, *, trials: int | None = None,
             timeout: float | None = None, callbacks: Sequence[Callback] = (),
             log: Log = _stderr, poll_seconds: float = 1.0,
             run: RunTrial = run_trial, propose: Propose = propose_params) -> WorkerResult:
    """Run trials until the study holds ``trials`` (default: the config's) COMPLETE trials,
    ``timeout`` seconds pass, or the worker stops (see the module docstring). ``propose(trial,
    ctx)`` suggests a trial's parameters (on the storage lane, ``search.lane``); ``run(trial,
    ctx)`` draws it (``search.trial.run_trial``; the sampler contract passes cheap ones)."""
    result = WorkerResult(trials or ctx.cfg.trials)
    rf.enter_wal(study._storage)
    _report_stale(study, log)
    if count(study, TrialState.COMPLETE) >= result.target:
        log(f"study {study.study_name!r} already holds {count(study, TrialState.COMPLETE)} "
            f"COMPLETE trials (target {result.target}); raise `trials` (or --trials) to run more")
    turns = _Turns(study, ctx, result, callbacks, run, propose, log)
    gc.freeze()  # the models and libraries loaded by now: the cyclic collector skips them
    try:
        with turns.heartbeat:
            try:
                turns.loop(timeout or ctx.cfg.timeout, log, poll_seconds)
            finally:
                with _held_interrupts():
                    turns.close()
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        _report_stale(study, log)
        if turns.shortlist:  # a round cut short: its best stays on the page
            _settle(study, turns.shortlist)
        rf.leave_wal(study._storage)
        gc.unfreeze()
    result.completed = count(study, TrialState.COMPLETE)
    return result


class _Turns:
    """The worker's loop. Storage work runs on the lane (``search.lane``); the draw in this
    thread. Proposing ahead (all but a person's studies, and unless ``propose_ahead: false``):
    trial N+1 is proposed while trial N draws."""

    def __init__(self, study: optuna.Study, ctx: StudyContext, result: WorkerResult,
                 callbacks: Sequence[Callback], run: RunTrial, propose: Propose, log: Log):
        self.study, self.ctx, self.result = study, ctx, result
        self.callbacks, self.run, self.propose = callbacks, run, propose
        self.person = ctx.cfg.objective in PERSON
        self.ahead = not self.person and getattr(ctx.cfg, "propose_ahead", True)
        self.heartbeat = Heartbeat(study)
        screening = getattr(ctx.cfg, "screening", None)
        self.lane = Lane(study, self.heartbeat, screening and Screening(
            screening.after, screening.threshold, ctx.space, log))
        self.next: Future | None = None  # the proposal being made
        self.stored: Future | None = None  # the last trial's finish
        self.fails = self.duplicates = 0
        self.shortlist: list[optuna.trial.FrozenTrial] = []  # this round's (1 unless mixed)

    def loop(self, timeout: float | None, log: Log, poll_seconds: float) -> None:
        result, study = self.result, self.study
        deadline = time.monotonic() + timeout if timeout else math.inf
        waiting = choosing = False
        while True:
            if self.next is None:  # nothing proposed ahead: settle the last trial, then decide
                if self.collect():
                    return
                complete, running = _tally(study)
                if complete >= result.target:
                    return
                if time.monotonic() >= deadline:
                    result.stopped = f"the timeout of {timeout:g} s passed"
                    return
                if self.person and not self.shortlist and preference.active(study) \
                        >= self.ctx.cfg.preference.candidates:
                    if not choosing:
                        log(_choice_line(self.ctx))
                    choosing = True
                    time.sleep(poll_seconds)
                    _report_stale(study, log)
                    continue
                choosing = False
                if complete + running >= result.target:
                    if not waiting:
                        log(_wait_line(study, result.target))
                    waiting = True
                    time.sleep(poll_seconds)
                    _report_stale(study, log)
                    continue
                self.next = self._propose()
            with _held_interrupts() as held:  # a proposal is started or handed back, whole
                proposal, self.next = self.next.result(), None
                started = proposal is not None and not held and time.monotonic() < deadline
                unstarted = started and (proposal.twin is not None or proposal.error is not None)
                if started:
                    self.lane.submit(self.lane.start, proposal)
                    if unstarted:
                        pending = self.lane.submit(*self._unstarted(proposal))
                    elif self.ahead and not self.fails:  # after a failure, in turn
                        self.next = self._propose()
                elif proposal is not None:  # Ctrl-C or the timeout first: back to the queue
                    self.lane.submit(self.lane.hand_back, proposal.trial)
            if held:  # Ctrl-C while it was started: it is recorded interrupted, never drawn
                if started and not unstarted:
                    self.lane.submit(self.lane.finish, proposal.trial, None, None,
                                     KeyboardInterrupt())
                raise KeyboardInterrupt
            if proposal is None or not started:  # handed back: the next turn decides
                continue
            waiting = False
            if unstarted:
                try:
                    stop = self.collect()
                finally:
                    self.stored = pending
                if proposal.error is not None and self._failed(proposal.error):
                    return
                if stop:
                    return
                continue
            if self.turn(proposal):
                return

    def _propose(self) -> Future:
        return self.lane.submit(self.lane.propose, self.ctx, self.result.target, self.propose)

    def _unstarted(self, proposal: Proposal) -> tuple:
        if proposal.error is not None:
            return self.lane.finish, proposal.trial, None, None, proposal.error
        return self.lane.duplicate, proposal

    def turn(self, proposal: Proposal) -> bool:
        """Draw the proposal, settle the trial before it, hand this one to the lane; True when
        the worker stops."""
        trial, value, record, error, pruned = proposal.trial, None, None, None, False
        try:
            if hasattr(self.ctx, "cheap_bar"):
                self.ctx.cheap_bar = proposal.cheap_bar
            drawn = self.run(trial, self.ctx)
            value, record, pruned = (drawn.value, drawn.record, drawn.pruned) \
                if isinstance(drawn, Drawn) else (drawn, None, False)
        except BaseException as exc:  # noqa: BLE001 - recorded, re-raised unless CAUGHT
            error = exc
        # failures in a row are counted as drawn (not once stored, a trial later): the worker
        # stops before it draws another
        failed = error is not None and not isinstance(error, DuplicateTrial)
        self.fails = self.fails + 1 if failed else 0
        stop = False
        with _held_interrupts() as held:
            try:
                stop = self.collect()
            except KeyboardInterrupt:
                error = KeyboardInterrupt()
                raise
            finally:
                if held:
                    error = KeyboardInterrupt()
                self.stored = self.lane.submit(self.lane.finish, trial, value, record, error,
                                               pruned)
        if isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt
        if error is not None and not isinstance(error, CAUGHT):
            raise error
        return self._too_many_fails() or stop

    def _failed(self, error: BaseException) -> bool:
        """A proposal that failed (the sampler raised): counted like a failed draw; True when
        the worker stops. Anything but a CAUGHT kind is a bug: re-raised (it is recorded)."""
        self.fails += 1
        if not isinstance(error, CAUGHT):
            raise error
        return self._too_many_fails()

    def _too_many_fails(self) -> bool:
        if self.fails >= FAILS_IN_A_ROW:
            self.result.stopped = f"{self.fails} trials in a row failed"
        return self.fails >= FAILS_IN_A_ROW

    def collect(self) -> bool:
        """Wait for the last trial to be stored; its callbacks; True when the worker stops."""
        if self.stored is None:
            return False
        frozen, self.stored = self.stored.result(), None
        result = self.result
        if frozen.state == TrialState.FAIL:
            result.failures.append((frozen.number, frozen.user_attrs.get(rf.ATTR_FAIL, "")))
        elif frozen.state == TrialState.COMPLETE:
            result.completed_here += 1
        if self.ctx.cfg.objective == "mixed" and frozen.state == TrialState.COMPLETE:
            self.shortlist.append(frozen)
            if len(self.shortlist) >= self.ctx.cfg.preference.pool:
                _settle(self.study, self.shortlist)
                self.shortlist = []
        for callback in self.callbacks:
            callback(self.study, frozen)
        self.duplicates = self.duplicates + 1 if ATTR_DUPLICATE in frozen.user_attrs else 0
        if self.duplicates >= DUPLICATES_IN_A_ROW:
            result.stopped = (f"the sampler proposed {self.duplicates} points in a row that "
                              "were already evaluated (the search has converged)")
        return result.stopped is not None

    def close(self) -> None:
        """Everything handed to the lane is stored; a proposal not started goes back to the
        queue; the last trial's callbacks run (unless one stops the worker again)."""
        try:
            if self.next is not None:
                proposal, self.next = self.next.result(), None
                if proposal is not None:
                    self.lane.submit(self.lane.hand_back, proposal.trial)
            if self.stored is not None:
                try:
                    self.collect()
                except KeyboardInterrupt:
                    pass
        finally:
            self.lane.close()


def _choice_line(ctx: StudyContext) -> str:
    shown = ctx.cfg.preference.candidates
    return (f"waiting for your choice: {shown} candidates are on the dashboard's study page; "
            "click the worst and the next candidate is drawn (Ctrl-C stops; the same command "
            "resumes)")


def _settle(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> None:
    """A mixed round: the scorers' best stays on the page, the others are hidden."""
    preference.settle_shortlist(
        study, trials, score=lambda t: t.user_attrs.get(rf.ATTR_SCORE, float("-inf")))


def _report_stale(study: optuna.Study, log: Log) -> None:
    failed = fail_stale_trials(study)
    if failed:
        log(f"marked FAIL: trial(s) {', '.join(map(str, failed))}, left RUNNING by a worker "
            "that stopped")
