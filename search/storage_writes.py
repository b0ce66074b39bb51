"""A trial's storage writes gathered and committed together: one transaction, not one each.

On an RDB storage every ``trial.suggest_float``, ``set_user_attr`` and artifact record is a
transaction of its own (on SQLite a commit and a sync: 25 suggests cost 0.12 s there against
0.001 s in memory). A trial of ``search.trial`` makes three batches instead: the worker's
name and first heartbeat as soon as the trial exists, every parameter once the whole vector
is proposed, every attribute (scores, timings, artifacts, the dashboard note) before the
trial is told.

Optuna has no public call for several writes in one transaction, so on an RDB storage this
module uses the storage's own per-row helpers (``RDBStorage._set_trial_*_without_commit``)
inside one session, the way ``RDBStorage`` itself fills a trial from a template. Any other
storage (in memory, journal) gets the same writes one by one through the public calls.
``tests/test_storage_writes.py`` checks that both give the same stored trial and study.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.storages import RDBStorage

try:  # the RDB storage's session helper and row models (see the module docstring)
    from optuna.storages._rdb import models as _models
    from optuna.storages._rdb.storage import _create_scoped_session
except ImportError:  # pragma: no cover - another Optuna layout: the public calls serve
    _models = None


class TrialWrites:
    """Writes to one trial (and its study's system attributes), committed by ``commit``.

    Example:
        >>> writes = TrialWrites(study, trial._trial_id)          # doctest: +SKIP
        >>> writes.param("IN04", 0.3, FloatDistribution(0, 1))  # doctest: +SKIP
        >>> writes.user_attr("worker", "host:123")                # doctest: +SKIP
        >>> writes.commit()                                       # doctest: +SKIP
    """

    def __init__(self, study: optuna.Study, trial_id: int):
        self.study = study
        self.trial_id = trial_id
        self.params: dict[str, tuple[float, BaseDistribution]] = {}
        self.user_attrs: dict[str, Any] = {}
        self.system_attrs: dict[str, Any] = {}
        self.study_system_attrs: dict[str, Any] = {}
        self.heartbeat = False

    def param(self, name: str, value: Any, distribution: BaseDistribution) -> None:
        self.params[name] = (distribution.to_internal_repr(value), distribution)

    def user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value

    def system_attr(self, key: str, value: Any) -> None:
        self.system_attrs[key] = value

    def study_system_attr(self, key: str, value: Any) -> None:
        self.study_system_attrs[key] = value

    def commit(self) -> None:
        """Write everything gathered (nothing when nothing was), then start empty again."""
        if not (self.params or self.user_attrs or self.system_attrs or
                self.study_system_attrs or self.heartbeat):
            return
        storage = self.study._storage
        backend = getattr(storage, "_backend", storage)
        if isinstance(backend, RDBStorage) and _models is not None:
            self._commit_rdb(storage, backend)
        else:
            self._commit_one_by_one(storage)
        self.params, self.user_attrs, self.system_attrs = {}, {}, {}
        self.study_system_attrs, self.heartbeat = {}, False

    def _commit_one_by_one(self, storage) -> None:
        for name, (internal, dist) in self.params.items():
            storage.set_trial_param(self.trial_id, name, internal, dist)
        for key, value in self.user_attrs.items():
            storage.set_trial_user_attr(self.trial_id, key, value)
        for key, value in self.system_attrs.items():
            storage.set_trial_system_attr(self.trial_id, key, value)
        for key, value in self.study_system_attrs.items():
            storage.set_study_system_attr(self.study._study_id, key, value)
        if self.heartbeat and hasattr(storage, "record_heartbeat"):
            storage.record_heartbeat(self.trial_id)

    def _commit_rdb(self, storage, rdb: RDBStorage) -> None:
        known = _known_distributions(storage, self.study._study_id)
        with _create_scoped_session(rdb.scoped_session, True) as session:
            trial = _models.TrialModel.find_or_raise_by_id(self.trial_id, session)
            rdb.check_trial_is_updatable(self.trial_id, trial.state)
            for name, (internal, dist) in self.params.items():
                if name in known:
                    check_distribution_compatibility(known[name], dist)
                    session.add(_models.TrialParamModel(
                        trial_id=self.trial_id, param_name=name, param_value=internal,
                        distribution_json=optuna.distributions.distribution_to_json(dist)))
                else:  # the storage looks up the study's earlier distribution itself
                    rdb._set_trial_param_without_commit(session, self.trial_id, name, internal,
                                                        dist)
            for model, attrs in ((_models.TrialUserAttributeModel, self.user_attrs),
                                 (_models.TrialSystemAttributeModel, self.system_attrs)):
                if attrs and not _upsert(session, rdb.engine.name, model, "trial_id",
                                         self.trial_id, attrs):
                    for key, value in attrs.items():
                        rdb._set_trial_attr_without_commit(session, model, self.trial_id, key,
                                                           value)
            if self.study_system_attrs and not _upsert(
                    session, rdb.engine.name, _models.StudySystemAttributeModel, "study_id",
                    self.study._study_id, self.study_system_attrs):
                _set_study_system_attrs(session, self.study._study_id, self.study_system_attrs)
            if self.heartbeat:
                _record_heartbeat(session, self.trial_id)
        for name, (_, dist) in self.params.items():
            known.setdefault(name, dist)


def _known_distributions(storage, study_id: int) -> dict[str, BaseDistribution]:
    """The study's parameter distributions the cached storage has seen (written to by us, as
    ``_CachedStorage.set_trial_param`` does); an empty dict for a bare RDB storage."""
    studies = getattr(storage, "_studies", None)
    if studies is None or study_id not in studies:
        return {}
    return studies[study_id].param_distribution


def _upsert(session, dialect: str, model, owner: str, owner_id: int,
            attrs: Mapping[str, Any]) -> bool:
    """Every attribute in one INSERT … ON CONFLICT UPDATE (rows keyed by ``owner`` and
    ``key``, as Optuna's attribute tables are): one statement, where Optuna's per-attribute
    helper makes two for each. False on a database without that statement (nothing done)."""
    if dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0):
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        return False
    rows = [{owner: owner_id, "key": key, "value_json": json.dumps(value)}
            for key, value in attrs.items()]
    statement = insert(model).values(rows)
    session.execute(statement.on_conflict_do_update(
        index_elements=[getattr(model, owner), model.key],
        set_={"value_json": statement.excluded.value_json}))
    return True


def _set_study_system_attrs(session, study_id: int, attrs: Mapping[str, Any]) -> None:
    """``RDBStorage.set_study_system_attr`` for several keys in the caller's session."""
    study = _models.StudyModel.find_or_raise_by_id(study_id, session)
    for key, value in attrs.items():
        row = _models.StudySystemAttributeModel.find_by_study_and_key(study, key, session)
        if row is None:
            session.add(_models.StudySystemAttributeModel(study_id=study_id, key=key,
                                                          value_json=json.dumps(value)))
        else:
            row.value_json = json.dumps(value)


def _record_heartbeat(session, trial_id: int) -> None:
    """``RDBStorage.record_heartbeat`` in the caller's session."""
    import sqlalchemy

    beat = _models.TrialHeartbeatModel.where_trial_id(trial_id, session, True)
    if beat is None:
        session.add(_models.TrialHeartbeatModel(trial_id=trial_id))
    else:
        beat.heartbeat = session.execute(sqlalchemy.func.now()).scalar()


class _DeferredWrites:
    """A trial's storage, except that its parameters and system attributes (a sampler's
    state: CMA-ES stores its optimizer and generation there) are gathered into ``writes``."""

    def __init__(self, storage, writes: TrialWrites):
        self._storage = storage
        self._writes = writes

    def set_trial_param(self, trial_id: int, name: str, internal: float,
                        distribution: BaseDistribution) -> None:
        if trial_id != self._writes.trial_id:  # another trial's: not this batch's to hold
            self._storage.set_trial_param(trial_id, name, internal, distribution)
        else:
            self._writes.params[name] = (internal, distribution)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id != self._writes.trial_id:
            self._storage.set_trial_system_attr(trial_id, key, value)
        else:
            self._writes.system_attrs[key] = value

    def __getattr__(self, name: str):
        return getattr(self._storage, name)


@contextmanager
def deferred_suggests(trial: optuna.Trial) -> Iterator[TrialWrites]:
    """``trial.suggest_*`` inside the block run as Optuna runs them (fixed, relative and
    independent parameters alike; the trial object keeps the values, so a later
    ``suggest_*`` of the same name returns them without a write) but the parameters, and the
    system attributes the sampler writes to this trial, are only gathered into the yielded
    ``TrialWrites``: the caller commits them (the worker does when the trial starts)."""
    writes = TrialWrites(trial.study, trial._trial_id)
    storage, study_storage = trial.storage, trial.study._storage
    # samplers write through the study (CMA-ES), suggest_* through the trial; the proxy passes
    # every other call through, so another thread using the study meanwhile sees no change
    trial.storage = trial.study._storage = _DeferredWrites(storage, writes)
    try:
        yield writes
    finally:
        trial.storage, trial.study._storage = storage, study_storage


@contextmanager
def batched_suggests(study: optuna.Study, trial: optuna.Trial) -> Iterator[TrialWrites]:
    """``deferred_suggests``, then every parameter written at once when the block ends.
    Nothing is written when the block raises."""
    with deferred_suggests(trial) as writes:
        yield writes
    writes.commit()
