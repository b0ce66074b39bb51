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

Ctrl-C (SIGINT) records the running trial as FAIL with the reason ``interrupted`` and stops;
``WorkerResult.interrupted`` then tells the command to exit with status 130. A worker stops by
itself after ``FAILS_IN_A_ROW`` failed trials in a row, or ``DUPLICATES_IN_A_ROW`` proposals of
points already evaluated.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from . import preference
from . import run_folder as rf
from .config import PERSON
from .liveness import Heartbeat, fail_stale_trials, mark_worker
from .trial import DuplicateTrial, StudyContext, TrialFailed, run_trial

FAILS_IN_A_ROW = 5
DUPLICATES_IN_A_ROW = 20
INTERRUPTED = "interrupted"
# A failure of one candidate (out of memory, NaN images, a scorer's error) is recorded and the
# study goes on; anything else is a bug and stops the worker (after recording the trial).
CAUGHT = (TrialFailed, RuntimeError, ValueError, OSError)
Log = Callable[[str], None]
Callback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]
RunTrial = Callable[[optuna.Trial, StudyContext], "float | list[float]"]


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
    """Hold SIGINT while the storage is written (ask, tell): a Ctrl-C never leaves a trial
    half-recorded. Yields the list of signals held; the caller acts on them afterwards."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield pending
    finally:
        signal.signal(signal.SIGINT, previous)


def _surplus(study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """Whether COMPLETE trials plus those running ahead of ``trial`` already reach the target."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    ahead = [t for t in trials if t.state == TrialState.COMPLETE
             or t.number < trial.number]
    return len(ahead) >= target


def _wait_line(study: optuna.Study, target: int) -> str:
    running = count(study, TrialState.RUNNING)
    return (f"waiting: {count(study, TrialState.COMPLETE)} of {target} trials are complete and "
            f"{running} running in other workers; another trial starts here only if one of "
            "them fails")


def optimize(study: optuna.Study, ctx: StudyContext, *, trials: int | None = None,
             timeout: float | None = None, callbacks: Sequence[Callback] = (),
             log: Log = _stderr, poll_seconds: float = 1.0,
             run: RunTrial = run_trial) -> WorkerResult:
    """Run trials until the study holds ``trials`` (default: the config's) COMPLETE trials,
    ``timeout`` seconds pass, or the worker stops (see the module docstring). ``run(trial,
    ctx)`` is one trial (``search.trial.run_trial``; the sampler contract passes a cheap one)."""
    result = WorkerResult(trials or ctx.cfg.trials)
    timeout = timeout or ctx.cfg.timeout
    deadline = time.monotonic() + timeout if timeout else math.inf
    fails = duplicates = 0
    waiting = choosing = False
    person = ctx.cfg.objective in PERSON
    shortlist: list[optuna.trial.FrozenTrial] = []  # this round's proposals (1 unless mixed)
    rf.enter_wal(study._storage)
    _report_stale(study, log)
    if count(study, TrialState.COMPLETE) >= result.target:
        log(f"study {study.study_name!r} already holds {count(study, TrialState.COMPLETE)} "
            f"COMPLETE trials (target {result.target}); raise `trials` (or --trials) to run more")
    try:
        while True:
            complete, running = _tally(study)
            if complete >= result.target:
                break
            if time.monotonic() >= deadline:
                result.stopped = f"the timeout of {timeout:g} s passed"
                break
            if person and not shortlist and preference.active(study) \
                    >= ctx.cfg.preference.candidates:
                if not choosing:
                    log(_choice_line(ctx))
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
            frozen = _one_trial(study, ctx, result, run)
            if frozen is None:  # handed back: other workers' trials reach the target
                continue
            waiting = False
            if ctx.cfg.objective == "mixed" and frozen.state == TrialState.COMPLETE:
                shortlist.append(frozen)
                if len(shortlist) >= ctx.cfg.preference.pool:
                    _settle(study, shortlist)
                    shortlist = []
            for callback in callbacks:
                callback(study, frozen)
            fails = fails + 1 if frozen.state == TrialState.FAIL else 0
            duplicates = duplicates + 1 if frozen.state == TrialState.PRUNED else 0
            if fails >= FAILS_IN_A_ROW:
                result.stopped = f"{fails} trials in a row failed"
                break
            if duplicates >= DUPLICATES_IN_A_ROW:
                result.stopped = (f"the sampler proposed {duplicates} points in a row that were "
                                  "already evaluated (the search has converged)")
                break
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        _report_stale(study, log)
        if shortlist:  # a round cut short: its best stays on the page
            _settle(study, shortlist)
        rf.leave_wal(study._storage)
    result.completed = count(study, TrialState.COMPLETE)
    return result


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


def _one_trial(study: optuna.Study, ctx: StudyContext, result: WorkerResult,
               run: RunTrial = run_trial) -> optuna.trial.FrozenTrial | None:
    """Ask, run, tell one trial; None when it was handed back to the queue unstarted."""
    with _held_interrupts() as held, warnings.catch_warnings():
        # Optuna suggests study.optimize for heartbeats; the worker beats itself (Heartbeat)
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = study.ask()
        mark_worker(study, trial)
        if not held and _surplus(study, trial, result.target):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
            return None
    value = None
    state = TrialState.COMPLETE
    error: BaseException | None = KeyboardInterrupt() if held else None
    if error is None:
        with Heartbeat(study, trial, beaten=True):
            try:
                value = run(trial, ctx)
            except DuplicateTrial:
                state = TrialState.PRUNED
            except BaseException as exc:  # noqa: BLE001 - recorded, re-raised unless CAUGHT
                error = exc
    with _held_interrupts() as held:
        if isinstance(error, KeyboardInterrupt):
            trial.set_user_attr(rf.ATTR_FAIL, INTERRUPTED)
            _requeue_warm_start(study, trial)
        frozen = _tell(study, trial, TrialState.FAIL if error else state, value)
    if held and error is None:
        error = KeyboardInterrupt()
    if frozen.state == TrialState.FAIL:
        result.failures.append((frozen.number, frozen.user_attrs.get(rf.ATTR_FAIL, "")))
    elif frozen.state == TrialState.COMPLETE:
        result.completed_here += 1
    if error is not None and not isinstance(error, CAUGHT):
        raise error
    return frozen


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState,
          value) -> optuna.trial.FrozenTrial:
    try:
        if state == TrialState.COMPLETE:
            return study.tell(trial, value)
        return study.tell(trial, state=state)
    except optuna.exceptions.UpdateFinishedTrialError:
        # another worker marked it FAIL while it ran (its heartbeat was late); its result is lost
        return study._storage.get_trial(trial._trial_id)


def _requeue_warm_start(study: optuna.Study, trial: optuna.Trial) -> None:
    """An interrupted warm start runs again on resume (warm starts are enqueued only once)."""
    stored = study._storage.get_trial(trial._trial_id)
    label, params = stored.user_attrs.get("warm_start"), stored.system_attrs.get("fixed_params")
    if label and params:
        study.enqueue_trial(params, user_attrs={"warm_start": label})
