"""Batched storage writes (search.storage_writes) store what Optuna's own calls store.

Each test makes the same trial twice, once through Optuna's public per-call API (the
reference) and once through the batch, on SQLite (one transaction) and in memory (the
public calls), and compares the stored trials and study attributes.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import closing

import optuna
import pytest
from optuna.distributions import FloatDistribution

from search import run_folder as rf
from search.storage_writes import TrialWrites, batched_suggests

SPACE = {f"b{i}": FloatDistribution(0.0, 1.0) for i in range(6)}


def _storage(kind: str, tmp_path, request=None):
    if kind == "sqlite":
        return rf.open_storage(f"sqlite:///{tmp_path / 'study.db'}", 10, 30, worker=True)
    if kind == "postgresql":
        return rf.open_storage(request.getfixturevalue("postgres_url"), 10, 30, worker=True)
    return optuna.storages.InMemoryStorage()


def _stored(study: optuna.Study, trial_id: int) -> tuple:
    t = study._storage.get_trial(trial_id)
    return (t.params, t.distributions, t.user_attrs,
            {k: v for k, v in t.system_attrs.items()})


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "memory"])
def test_a_batch_stores_what_the_per_call_api_stores(kind, tmp_path, request):
    study = optuna.create_study(storage=_storage(kind, tmp_path, request),
                                sampler=optuna.samplers.RandomSampler(seed=3))
    reference = study.ask()
    for name, dist in SPACE.items():
        reference.suggest_float(name, dist.low, dist.high)
    reference.set_user_attr("scores", {"clip": 0.25})
    study._storage.set_trial_system_attr(reference._trial_id, "artifacts:x", "{}")
    study._storage.set_study_system_attr(study._study_id, "note:ref", "body")

    trial = study.ask()
    writes = TrialWrites(study, trial._trial_id)
    for name, value in reference.params.items():
        writes.param(name, value, SPACE[name])
    writes.user_attr("scores", {"clip": 0.25})
    writes.system_attr("artifacts:x", "{}")
    writes.study_system_attr("note:batch", "body")
    writes.commit()
    assert _stored(study, trial._trial_id) == _stored(study, reference._trial_id)
    assert study._storage.get_study_system_attrs(study._study_id)["note:batch"] == "body"


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_batched_suggests_propose_what_plain_suggests_propose(kind, tmp_path):
    """Same sampler, same seed, same history: the batched trial's parameters equal those a
    plain suggest_float loop gets, and enqueued (fixed) parameters are kept."""
    def run(storage, batched: bool) -> list[dict]:
        study = optuna.create_study(storage=storage, study_name="s",
                                    sampler=optuna.samplers.TPESampler(seed=1,
                                                                       n_startup_trials=3))
        study.enqueue_trial({"b0": 0.125})
        out = []
        for _ in range(6):
            trial = study.ask()
            if batched:
                with batched_suggests(study, trial):
                    params = {n: trial.suggest_float(n, d.low, d.high) for n, d in SPACE.items()}
            else:
                params = {n: trial.suggest_float(n, d.low, d.high) for n, d in SPACE.items()}
            study.tell(trial, sum(params.values()))
            out.append(study._storage.get_trial(trial._trial_id).params)
        return out

    plain = run(optuna.storages.InMemoryStorage(), False)
    batched = run(_storage(kind, tmp_path), True)
    assert batched == plain
    assert batched[0]["b0"] == 0.125


def test_a_failed_proposal_writes_no_parameter(tmp_path):
    study = optuna.create_study(storage=_storage("sqlite", tmp_path))
    trial = study.ask()
    with pytest.raises(RuntimeError), batched_suggests(study, trial):
        trial.suggest_float("b0", 0.0, 1.0)
        raise RuntimeError("the candidate could not be built")
    assert study._storage.get_trial(trial._trial_id).params == {}


def test_the_heartbeat_is_recorded_in_the_batch(tmp_path):
    study = optuna.create_study(storage=_storage("sqlite", tmp_path))
    trial = study.ask()
    writes = TrialWrites(study, trial._trial_id)
    writes.heartbeat = True
    writes.commit()
    with sqlite3.connect(tmp_path / "study.db") as db:
        rows = db.execute("SELECT trial_id FROM trial_heartbeats").fetchall()
    assert rows == [(trial._trial_id,)]


def test_a_worker_writes_sqlite_in_write_ahead_log_mode_and_leaves_it(tmp_path):
    """Commits do not wait for the disk while a worker runs (a killed writer still loses
    nothing it committed: tests/test_crash_study.py kills workers); when it stops the database
    is a plain rollback-journal file again, alone in its folder."""
    storage = _storage("sqlite", tmp_path)
    study = optuna.create_study(storage=storage)
    rf.enter_wal(study._storage)  # what the worker loop does first
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with closing(sqlite3.connect(tmp_path / "study.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    rf.leave_wal(study._storage)
    with closing(sqlite3.connect(tmp_path / "study.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.db"]
    rf.enter_wal(study._storage)  # the same process runs trials again
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with closing(sqlite3.connect(tmp_path / "study.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_worker_switches_to_write_ahead_log_while_another_is_writing(tmp_path):
    """Two workers start together: one holds a write transaction (rollback journal still) as
    the other's first connection asks for WAL. SQLite refuses that at once, "database is
    locked", without waiting (the traceback CI once printed); the worker waits for the writer
    instead, and the database is in WAL mode once both are done."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=url, study_name="pair")
    worker = rf.open_storage(url, worker=True)
    rf.enter_wal(worker)
    errors: list[BaseException] = []

    def first_read() -> None:
        try:
            worker.get_all_studies()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    with closing(sqlite3.connect(tmp_path / "study.db", isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE studies SET study_name = 'pair'")
        reader = threading.Thread(target=first_read)
        reader.start()
        time.sleep(0.3)  # the reader meets the lock
        other.execute("COMMIT")
        reader.join(timeout=30)
    assert not reader.is_alive()
    assert errors == []
    with closing(sqlite3.connect(tmp_path / "study.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    rf.leave_wal(worker)


def test_a_samplers_own_trial_writes_wait_for_the_commit(tmp_path):
    """CMA-ES stores its optimizer and generation in the trial's system attributes through the
    study's storage; inside ``deferred_suggests`` they join the batch: nothing is stored before
    the commit, and after it the study holds what plain suggests store (CMA-ES continues from
    it identically: the oracle is the same loop without the batch, in memory)."""
    def run(storage, batched: bool) -> list[tuple]:
        study = optuna.create_study(storage=storage, study_name="s",
                                    sampler=optuna.samplers.CmaEsSampler(seed=2,
                                                                         n_startup_trials=2))
        for _ in range(9):
            trial = study.ask()
            if batched:
                with batched_suggests(study, trial):
                    params = {n: trial.suggest_float(n, d.low, d.high) for n, d in SPACE.items()}
                    if trial.number >= 2:  # CMA-ES proposes from the third trial on
                        assert study._storage.get_trial(trial._trial_id).system_attrs == {}
            else:
                params = {n: trial.suggest_float(n, d.low, d.high) for n, d in SPACE.items()}
            study.tell(trial, sum((v - 0.3) ** 2 for v in params.values()))
        return [_stored(study, t._trial_id) for t in study.trials]

    plain = run(optuna.storages.InMemoryStorage(), False)
    batched = run(_storage("sqlite", tmp_path), True)
    assert any("cma:generation" in row[3] for row in plain)
    assert batched == plain


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_batch_overwrites_attributes_already_stored(kind, tmp_path, request):
    """Attributes go in as one upsert on SQLite and PostgreSQL: a key stored before (by
    Optuna's call or by an earlier batch) takes the new value, as ``set_trial_user_attr``
    would give it."""
    study = optuna.create_study(storage=_storage(kind, tmp_path, request))
    trial = study.ask()
    study._storage.set_trial_user_attr(trial._trial_id, "scores", {"clip": 0.1})
    writes = TrialWrites(study, trial._trial_id)
    writes.user_attr("scores", {"clip": 0.2})
    writes.user_attr("timings", [1, 2])
    writes.system_attr("artifacts:x", "{}")
    writes.study_system_attr("note:a", "one")
    writes.commit()
    writes.user_attr("timings", [3])
    writes.system_attr("artifacts:x", "{\"id\": 1}")
    writes.study_system_attr("note:a", "two")
    writes.commit()
    stored = study._storage.get_trial(trial._trial_id)
    assert stored.user_attrs == {"scores": {"clip": 0.2}, "timings": [3]}
    assert stored.system_attrs == {"artifacts:x": "{\"id\": 1}"}
    assert study._storage.get_study_system_attrs(study._study_id)["note:a"] == "two"
