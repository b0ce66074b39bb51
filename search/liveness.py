"""Which RUNNING trials still have a worker, and failing those that do not.

A worker killed mid-trial (SIGKILL, a lost machine) leaves its trial RUNNING. Two signs say it
is gone:
- its process: every trial records the worker (``host:pid``) and the machine's boot id; on the
  same machine and boot, a pid that no longer exists is a dead worker, known at once;
- its heartbeat: RDB storages with ``heartbeat_seconds`` hold each running trial's last sign of
  life; one older than ``grace_seconds`` is stale (the only sign across machines); a trial with
  neither a worker nor a heartbeat (its worker was killed between asking for it and marking it)
  is stale once it started longer than ``grace_seconds`` ago.
Workers fail such trials when they start, while they wait, and when they stop; ``mergesearch
status RUN --fail-stale`` does it by hand. Each gets the fail reason ``STALE_REASON``; a warm
start failed so is queued again (``search.warm_starts``).
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import datetime, timedelta
from pathlib import Path

import optuna
from optuna.trial import TrialState

from merge_backend.partial_files import process_gone

from . import run_folder as rf
from . import warm_starts
from .storage_writes import TrialWrites

WORKER = f"{socket.gethostname()}:{os.getpid()}"
ATTR_BOOT = "worker_boot"  # the worker machine's boot id: with host:pid, names one live process
STALE_REASON = "stale: its worker stopped (killed, or no heartbeat within grace_seconds)"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux: only heartbeats tell
        return ""


BOOT_ID = _boot_id()


def mark_worker(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record which process runs ``trial``, with its first heartbeat on an RDB storage, in one
    write (done first, before anything can fail)."""
    writes = TrialWrites(study, trial._trial_id)
    writes.user_attr(rf.ATTR_WORKER, WORKER)
    if BOOT_ID:
        writes.user_attr(ATTR_BOOT, BOOT_ID)
    writes.heartbeat = bool(heartbeat_interval(study))
    writes.commit()


def _process_gone(trial: optuna.trial.FrozenTrial) -> bool:
    worker = str(trial.user_attrs.get(rf.ATTR_WORKER, ""))
    host, _, pid = worker.rpartition(":")
    if not BOOT_ID or trial.user_attrs.get(ATTR_BOOT) != BOOT_ID or host != socket.gethostname():
        return False
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    return process_gone(int(pid))  # a killed worker not yet reaped by its parent is gone too


def heartbeat_interval(study: optuna.Study) -> int | None:
    get = getattr(study._storage, "get_heartbeat_interval", None)
    return get() if get is not None else None


def stale_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials whose worker process is gone or whose heartbeat is past the grace period."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    stale_ids: set[int] = set()
    interval = heartbeat_interval(study)
    if interval:
        # Optuna's own query (what optuna.storages.fail_stale_trials uses), so the rule is the
        # storage's: last heartbeat older than the grace period
        stale_ids.update(study._storage._get_stale_trial_ids(study._study_id))
        # a trial asked for but never marked (its worker killed between ask and mark_worker)
        # has no heartbeat for that query: stale once it is older than the grace period
        backend = getattr(study._storage, "_backend", study._storage)
        grace = timedelta(seconds=getattr(backend, "grace_period", None) or 2 * interval)
        now = datetime.now()
        stale_ids.update(t._trial_id for t in running if rf.ATTR_WORKER not in t.user_attrs
                         and t.datetime_start is not None and now - t.datetime_start > grace)
    return [t for t in running if t._trial_id in stale_ids or _process_gone(t)]


def fail_stale_trials(study: optuna.Study) -> list[int]:
    """Mark every stale trial FAIL with ``STALE_REASON``; returns their numbers. A storage
    that refuses the write (read-only, locked by another process) raises RunError naming the
    trial and the driver's reason."""
    failed = []
    for trial in stale_trials(study):
        try:
            study._storage.set_trial_user_attr(trial._trial_id, rf.ATTR_FAIL, STALE_REASON)
            if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                failed.append(trial.number)
                warm_starts.requeue(study, trial)  # only the worker that failed it
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker got there first, or it finished after all
        except optuna.exceptions.StorageInternalError as exc:
            raise rf.RunError(f"cannot mark trial {trial.number} FAIL: "
                              f"{rf.storage_reason(exc)}") from None
    return failed


class Heartbeat:
    """Records the heartbeat of every trial the worker holds (``hold`` / ``release``: the one
    drawing, the one proposed ahead, the one being stored) every heartbeat interval, as
    ``study.optimize`` does for its trial (the worker uses ask and tell). ``mark_worker`` records
    each trial's first beat, so a worker killed in the first interval is still found stale."""

    def __init__(self, study: optuna.Study):
        self._storage = study._storage
        self._interval = heartbeat_interval(study)
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, trial_id: int) -> None:
        with self._lock:
            self._held.add(trial_id)

    def release(self, trial_id: int) -> None:
        with self._lock:
            self._held.discard(trial_id)

    def held(self) -> frozenset[int]:
        """The ids of the trials this worker holds now."""
        with self._lock:
            return frozenset(self._held)

    def __enter__(self) -> Heartbeat:
        if self._interval:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="mergesearch-heartbeat")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                held = sorted(self._held)
            for trial_id in held:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a missed beat is retried; the trial goes on
                    pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
