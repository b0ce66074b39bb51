"""Opening a run folder's study: one worker at a time, and a failed start takes back only what
it made.

A worker checks what a run folder holds early (an existing study's config and sources, before
anything loads); once everything has loaded it opens the study or makes it: the SQLite
database, the study, ``run.json``. That last part runs under the folder's opening lock
(``Opening``: an exclusive ``flock`` on the run folder itself, so the lock leaves no file
behind), and a worker that finds a database without ``run.json`` waits for the lock before it
looks inside (``wait_for_opening``). So no worker opens a database that another one is still
making, or one the other is about to take back after a Ctrl-C or an error. A worker killed
inside the window gives its lock back with its process; the database it made stays and is
found as before (``status`` names it, ``run`` starts it again). Where ``flock`` does not exist
(Windows), nothing is locked.

Example:
    >>> with Opening(folder, folder / "study.db") as opening:  # doctest: +SKIP
    ...     made = opening.claim()  # False: another worker made the database first
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .run_folder import CONFIG_FILE, RUN_FILE, dispose_storage

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None


def _same_folder(path: Path, fd: int) -> bool:
    """Whether ``fd`` (opened on ``path``) is still the folder at ``path``: another worker's
    take-back may have removed it, and a third made it again, while this one waited."""
    try:
        here, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def wait_for_opening(path: Path) -> None:
    """Wait while another worker holds ``path``'s opening lock (it is making or taking back the
    study there); at once when none does, or ``path`` is not a folder."""
    if fcntl is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)  # closing gives the lock back


class Opening:
    """The run folder ``path`` made if missing and its opening lock held, for the ``with``
    block (see the module docstring). ``claim`` makes the SQLite database ``db_file`` unless
    another worker has; ``undo`` takes back a start that stopped before its run.json (Ctrl-C,
    an error): only a claim's files and the folders this made go, so a worker never removes a
    database another one made."""

    def __init__(self, path: Path, db_file: Path | None) -> None:
        self.path = Path(path)
        self.db_file = db_file
        self.made: list[Path] = []  # folders this made, deepest first
        self.new_files: list[Path] = []
        self.claimed = False
        self._fd: int | None = None

    def __enter__(self) -> Opening:
        while True:
            missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            self.made += [p for p in missing if p not in self.made]
            if fcntl is None:
                return self
            fd = os.open(self.path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_folder(self.path, fd):
                self._fd = fd
                return self
            os.close(fd)  # taken back while this waited: make it again

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None and not self.claimed:  # stopped before a claim: only empty folders
            for folder in self.made:
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty (or gone): the rest hold it
        if self._fd is not None:
            os.close(self._fd)  # closing gives the lock back
            self._fd = None

    def claim(self) -> bool:
        """Make the database file (empty: SQLite writes its schema); False when another worker
        made it first."""
        if self.db_file is None:
            return False
        db = self.db_file
        files = [self.path / RUN_FILE, self.path / CONFIG_FILE, db,
                 db.with_name(f"{db.name}-wal"), db.with_name(f"{db.name}-shm")]
        new_files = [f for f in files if not f.exists()]
        try:
            os.close(os.open(db, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            return False
        self.new_files, self.claimed = new_files, True
        return True

    def undo(self, storage: Any) -> None:
        """Close ``storage`` (or None) and remove what the claim made: its files and the
        folders this made. Nothing when this worker made no database."""
        if not self.claimed:
            return
        dispose_storage(storage)
        for file in self.new_files:
            file.unlink(missing_ok=True)
        if self.made:
            shutil.rmtree(self.made[-1], ignore_errors=True)
