"""A run folder: where a study's config, storage, artifacts and exports live.

    RUN/
      run.json        study name, storage URL, heartbeat and grace seconds (written when the
                      study starts; a folder moved or copied elsewhere reads its own
                      study.db, `storage_in_folder`)
      config.yaml     the resolved study config (absolute paths)
      study.db        SQLite storage (default; any Optuna RDB URL may be used instead)
      artifacts/      optuna FileSystemArtifactStore: probe grids, ratio charts
      exports/        what `mergesearch export` writes by default

Every trial that completes carries, as user attributes:
  ``recipe``   the Recipe it scored (Recipe.to_dict(), absolute source paths and their sha256)
  ``scores``   {scorer name: raw value}, ``score`` the combined value
  ``timings``  {phase: seconds}
  ``worker``   host:pid of the worker process that ran it
  ``artifact:probes`` / ``artifact:ratios``  artifact ids of the labelled probe grid (PNG) and
               the ratio chart (SVG), stored in this order
and a dashboard note with its scores and export command. In a preference or mixed study,
each trial carries ``candidate_image`` (``search.preference``). So anything downstream (export,
dashboard, notebook) needs only the storage and this folder.
A failed trial carries ``fail_reason`` (``interrupted`` after Ctrl-C); a trial skipped because
its parameters were already evaluated is PRUNED with ``duplicate_of``; with ``fidelity``, every
trial carries ``cheap_score`` (and ``cheap_bar`` once there is one), and one whose cheap probes
scored below the bar is PRUNED with those two (and ``timings``) only. With ``screening``, the
study carries the decision as its user attribute ``screening``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import optuna
import yaml

from merge_backend import Recipe
from merge_backend.atomic_files import atomic_write_text

from . import preference

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
DB_FILE = "study.db"  # the default storage, inside the run folder
ATTR_RECIPE = "recipe"
ATTR_SCORES = "scores"
ATTR_SCORE = "score"
ATTR_TIMINGS = "timings"
ATTR_FAIL = "fail_reason"
ATTR_WORKER = "worker"  # host:pid of the process that ran the trial
ATTR_WARM_START = "warm_start"  # a queued warm start's label (search.warm_starts)
ARTIFACT_PROBES = "artifact:probes"
ARTIFACT_RATIOS = "artifact:ratios"
STUDY_ATTR_PROBES = "probe_set"
STUDY_ATTR_SCORERS = "scorers"
DEFAULT_HEARTBEAT, DEFAULT_GRACE = 30, 90


class RunError(ValueError):
    """A run folder or study that cannot be used; the message says what is missing."""


@dataclass(frozen=True)
class RunFolder:
    path: Path
    study_name: str
    storage: str
    heartbeat_seconds: int = DEFAULT_HEARTBEAT
    grace_seconds: int = DEFAULT_GRACE

    @property
    def artifact_dir(self) -> Path:
        return self.path / "artifacts"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def exports(self) -> Path:
        return self.path / "exports"

    def own_files(self) -> list[Path]:
        """What the run keeps of itself (an export must not write over any of it)."""
        files = [RUN_FILE, DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm"]
        return [self.path / name for name in files] + [self.config_path, self.artifact_dir]

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        data = {"study_name": self.study_name, "storage": self.storage,
                "heartbeat_seconds": self.heartbeat_seconds, "grace_seconds": self.grace_seconds}
        if sqlite_file(self.storage) == (self.path / DB_FILE).resolve():
            data["storage_in_folder"] = DB_FILE  # a copy of the folder reads its own copy
        atomic_write_text(self.path / RUN_FILE, json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> RunFolder:
        path = Path(path)
        meta = path / RUN_FILE
        if not path.is_dir():
            what = "a file, not a run folder" if path.exists() else "no such run folder"
            raise RunError(f"{path}: {what}; pass the folder `mergesearch run` made "
                           "(output/NAME)")
        if not meta.is_file():
            if (path / DB_FILE).is_file():
                raise RunError(f"{path}: a run stopped while it started (a {DB_FILE}, no "
                               f"{RUN_FILE}); run its config again (`mergesearch run CONFIG`) "
                               "to start it")
            raise RunError(f"{path}: not a mergesearch run folder (no {RUN_FILE}); pass the "
                           "output folder of `mergesearch run`")
        redo = "run the study's config again (`mergesearch run CONFIG`) to rewrite it"
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise RunError(f"{meta}: not valid JSON ({exc}); {redo}") from None
        if not isinstance(data, dict):
            raise RunError(f"{meta}: expected a JSON object; {redo}")
        missing = [k for k in ("study_name", "storage") if not isinstance(data.get(k), str)]
        if missing:
            raise RunError(f"{meta}: lacks {' and '.join(missing)}; {redo}")
        timing = {k: data[k] for k in ("heartbeat_seconds", "grace_seconds")
                  if isinstance(data.get(k), int)}
        storage, db = data["storage"], sqlite_file(data["storage"])
        if data.get("storage_in_folder") == DB_FILE and db is not None and db.name == DB_FILE:
            storage = default_storage(path)
        else:  # custom storage, or a run.json written before storage_in_folder
            storage = _moved_with_folder(storage, path)
        return cls(path, data["study_name"], storage, **timing)

    def study(self) -> optuna.Study:
        """The study, through a storage that knows the heartbeat settings (for stale trials)."""
        db = sqlite_file(self.storage)
        if db is not None and not db.is_file():  # opening it would make an empty one
            raise RunError(f"{self.path / RUN_FILE}: its storage {db} does not exist; the "
                           "study's database was moved or deleted")
        if db is not None and db.stat().st_size == 0:  # opening it would write a schema in
            raise RunError(f"{self.path / RUN_FILE}: its storage {db} is empty (0 bytes): the "
                           "study's database was truncated or never written; restore it from "
                           "a copy")
        try:
            storage = open_storage(self.storage, self.heartbeat_seconds, self.grace_seconds)
        except Exception as exc:  # noqa: BLE001 - drivers raise their own kinds
            raise RunError(f"{self.path / RUN_FILE}: cannot open storage {self.storage}: "
                           f"{storage_reason(exc)}") from None
        try:
            return optuna.load_study(study_name=self.study_name, storage=storage)
        except KeyError:
            raise RunError(f"{self.path}: storage {self.storage} has no study "
                           f"{self.study_name!r}") from None

    def artifact_store(self):
        from optuna.artifacts import FileSystemArtifactStore

        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        return FileSystemArtifactStore(str(self.artifact_dir))

    def artifact_bytes(self, artifact_id: str | None) -> bytes | None:
        """A stored artifact's bytes (None when there is none: it only costs a page a picture)."""
        if not artifact_id or not self.artifact_dir.is_dir():
            return None
        from optuna.artifacts import FileSystemArtifactStore
        from optuna.artifacts.exceptions import ArtifactNotFound

        try:
            with FileSystemArtifactStore(str(self.artifact_dir)).open_reader(artifact_id) as f:
                return f.read()
        except (ArtifactNotFound, OSError):
            return None

    def config_folder(self) -> Path | None:
        """The diffusers config folder the study loaded its checkpoints with (config.yaml)."""
        try:
            folder = (yaml.safe_load(self.config_path.read_text()) or {}).get("config_folder")
        except (OSError, yaml.YAMLError, AttributeError):
            return None
        return Path(folder) if isinstance(folder, str) and Path(folder).is_dir() else None

    # ------------------------------------------------------------------ portable sources
    def _started_in(self) -> Path | None:
        """The folder `run` was started in, for run folders whose config.yaml holds relative
        paths (made before paths were stored absolute): the run folder is OUTPUT/NAME there."""
        try:
            config = yaml.safe_load(self.config_path.read_text())
            output = Path(os.path.normpath(config["output"])) / config["name"]
        except (OSError, yaml.YAMLError, TypeError, KeyError):
            return None
        here = self.path.absolute()
        if output.is_absolute() or ".." in output.parts or here.parts[-len(output.parts):] \
                != output.parts:
            return None
        return Path(*here.parts[:-len(output.parts)])

    def resolve(self, path: str) -> str:
        """A source path a trial recorded, as an absolute path that exists where possible."""
        if os.path.isabs(path):
            return path
        started = self._started_in()
        for base in ([started] if started else []) + [Path.cwd()]:
            candidate = os.path.normpath(base / path)
            if os.path.exists(candidate):
                return candidate
        return os.path.abspath(path)

    def portable(self, recipe: Recipe) -> Recipe:
        """``recipe`` with every source and LoRA path resolved (``resolve``)."""
        models = {role: dataclasses.replace(src, path=self.resolve(src.path))
                  for role, src in recipe.models.items()}
        loras = tuple(dataclasses.replace(lora, path=self.resolve(lora.path))
                      for lora in recipe.loras)
        return recipe.replace(models=models, loras=loras)


def _moved_with_folder(url: str, folder: Path) -> str:
    """``url``, or the run folder's own database where the folder was moved since an older
    run.json (no ``storage_in_folder``) was written: a SQLite file that is no longer at its
    stored path, and one of its name inside the folder. The study name is still checked when
    the study is opened."""
    db = sqlite_file(url)
    if db is None or db.is_file() or not (folder / db.name).is_file():
        return url
    return f"sqlite:///{(folder / db.name).resolve()}"


def storage_reason(exc: BaseException) -> str:
    """A storage error's reason in one line: the database driver's own words where Optuna
    wrapped them (StorageInternalError from SQLAlchemy's error from sqlite3's or psycopg's)."""
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    cause = getattr(cause, "orig", None) or cause
    text = str(cause).strip()
    return text.splitlines()[0] if text else repr(cause)


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other storages)."""
    if not url.startswith("sqlite:///"):
        return None
    name = unquote(url.removeprefix("sqlite:///").split("?")[0])  # %20: as SQLAlchemy reads it
    return Path(name) if name and name != ":memory:" else None


def open_storage(url: str, heartbeat_seconds: int = DEFAULT_HEARTBEAT,
                 grace_seconds: int = DEFAULT_GRACE, worker: bool = False) -> Any:
    """Optuna storage for ``url``: RDB URLs with heartbeats (a killed worker's trial can be
    found), anything else as Optuna opens it. ``worker``: a SQLite file in write-ahead-log mode
    until the worker stops (``_fast_sqlite``, ``leave_wal``)."""
    if not url.startswith(("sqlite", "postgresql", "mysql")):
        return optuna.storages.get_storage(url)
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(6):
        try:
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_seconds, grace_period=grace_seconds)
            return _fast_sqlite(storage) if worker else storage
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            # Workers started together race to create the schema (SQLite says "table …
            # already exists", PostgreSQL a duplicate key); the loser retries and finds it made.
            schema_race = not isinstance(exc, OperationalError) or "already exists" in str(exc)
            if attempt == 5 or not schema_race:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _fast_sqlite(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """A SQLite database file in write-ahead-log mode with ``synchronous=NORMAL``: a commit
    appends to the log without waiting for the disk (a few ms less for each of a trial's
    writes), readers (the dashboard, other workers) never wait for a writer, and a killed
    process loses nothing it committed; only a power cut can lose the last commits. SQLite
    documents WAL for one machine's disks, not network file systems: use PostgreSQL there."""
    from sqlalchemy import event

    engine = storage.engine
    if engine.dialect.name != "sqlite" or sqlite_file(str(engine.url)) is None:
        return storage

    @event.listens_for(engine, "connect")
    def _pragmas(connection, _record) -> None:
        connection.isolation_level = None  # the driver opens no transaction: ``_immediate`` does
        cursor = connection.cursor()
        if id(engine) not in _WAL_LEFT:
            _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _immediate(connection) -> None:
        # Each transaction takes the write lock as it begins. Optuna's ask reads the WAITING
        # trials, then sets one RUNNING; the driver's own transactions begin only at the write,
        # so two workers could both read a trial WAITING and both take it (measured: 9 of 20
        # asks by two processes on one queue got a trial the other got too).
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    # WAL starts when the worker's loop does (``enter_wal``): a start that fails (another
    # config, a changed source) leaves the database file as it was
    _WAL_ENGINES.add(id(engine))
    _WAL_LEFT.add(id(engine))
    return storage


def _switch_to_wal(cursor: Any, patience: float = 10.0) -> None:
    """``PRAGMA journal_mode=WAL`` on a new connection. SQLite answers "database is locked" at
    once, without waiting, while another connection holds a write transaction (another worker
    started together: measured in CI and in tests/test_storage_writes.py), so the switch is
    tried again after that writer's few milliseconds, for ``patience`` seconds. A database
    still locked then stays in the journal mode it has (another worker's WAL, or the rollback
    journal: slower commits, the same data); the next connection tries again."""
    import sqlite3

    deadline = time.monotonic() + patience
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            if time.monotonic() + pause > deadline:
                return
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


_WAL_ENGINES: set[int] = set()  # engines (by id) opened for a worker (``_fast_sqlite``)
_WAL_LEFT: set[int] = set()  # ... whose worker stopped: no WAL on reconnects


def _engine(storage: Any):
    return getattr(getattr(storage, "_backend", storage), "engine", None)


def enter_wal(storage: Any) -> None:
    """A worker starts (again) on a storage opened for one: write-ahead log from now on."""
    engine = _engine(storage)
    if engine is not None and id(engine) in _WAL_LEFT:
        _WAL_LEFT.discard(id(engine))
        engine.dispose()


def leave_wal(storage: Any) -> None:
    """Back to SQLite's default rollback journal when a worker stops, so the run folder holds
    `study.db` alone again (the `-wal` / `-shm` files go) and later readers leave nothing
    behind. While another worker still has the database open SQLite keeps WAL: that worker
    switches it back when it stops."""
    engine = _engine(storage)
    if engine is None or id(engine) not in _WAL_ENGINES:
        return
    import sqlite3

    from sqlalchemy.exc import OperationalError

    _WAL_LEFT.add(id(engine))
    engine.dispose()
    try:  # outside a transaction (each of this engine's begins with the write lock)
        connection = engine.raw_connection()
        try:
            connection.driver_connection.execute("PRAGMA journal_mode=DELETE")
        finally:
            connection.close()
    except (OperationalError, sqlite3.OperationalError):  # another worker is writing: it
        pass  # switches back when it stops
    engine.dispose()


def dispose_storage(storage: Any) -> None:
    """Close an SQL storage's connections (or nothing: None, another kind of storage)."""
    engine = _engine(storage) if storage is not None else None
    if engine is not None:
        engine.dispose()


def default_storage(path: Path) -> str:
    return f"sqlite:///{(Path(path) / DB_FILE).resolve()}"


def trial_recipe(trial: optuna.trial.FrozenTrial) -> Recipe:
    if ATTR_RECIPE not in trial.user_attrs:
        raise RunError(f"trial {trial.number} carries no recipe")
    return Recipe.from_dict(trial.user_attrs[ATTR_RECIPE])


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE]


def ranked(study: optuna.Study, preferential: bool | None = None
           ) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials best first: the one order ``best``, ``status``, ``export --best`` and the
    progress line share. Single objective: by value (the study's direction), equal values by
    trial number (the earlier trial first). Several objectives: the Pareto front by number.
    A person's study (preference, mixed): by the person's choices (``preference.ranked``);
    ``preferential`` says whether it is one, when the caller knows (else it is read)."""
    if preferential is None:
        preferential = preference.is_preferential(study)
    if preferential:
        return preference.ranked(study)
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted(completed(study), key=lambda t: (sign * t.value, t.number))


def best_trial(study: optuna.Study, preferential: bool | None = None
               ) -> optuna.trial.FrozenTrial | None:
    """The best trial by ``ranked``'s rule (None before one completes)."""
    order = ranked(study, preferential)
    return order[0] if order else None


def pick_trials(study: optuna.Study, *, number: int | None = None, best: bool = False,
                pareto: int | None = None) -> list[optuna.trial.FrozenTrial]:
    """The trials an export names: one by number, the best, or the first K of the Pareto front."""
    done = completed(study)
    if not done:
        raise RunError(f"study {study.study_name!r} has no completed trial yet; nothing to export")
    if number is not None:
        match = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not match:
            raise RunError(f"study {study.study_name!r} has no trial {number}")
        if match[0].state != optuna.trial.TrialState.COMPLETE:
            raise RunError(f"trial {number} is {match[0].state.name}, not COMPLETE")
        return match
    order = ranked(study)
    return order[:pareto] if pareto is not None and len(study.directions) > 1 else order[:1]
