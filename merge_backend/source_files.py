"""Paths a user names as inputs: checked before anything opens them.

A FIFO or a character device opened for reading can block forever (or never end), a socket
cannot be read at all, and on Python 3.11 a symlink loop makes ``Path.resolve`` raise
``RuntimeError``. Each of these becomes a one-line error naming the path, raised before the
first read, with the caller's error class (``CheckpointError``, ``LoraError``, ...).

Example:
    >>> try:
    ...     check_source("/dev/null")
    ... except SourceFileError as exc:
    ...     print(exc)
    /dev/null: a character device, not a regular file; name a weights file
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class SourceFileError(ValueError):
    """An input path that names no readable regular file; the message names the path."""


def _stat(path: str | Path, error: type[Exception], what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{path}: a symlink loop (the link points back to itself); "
                        "name the real file") from None
        raise error(f"{path}: cannot be read ({exc.strerror})") from None


def check_source(path: str | Path, *, error: type[Exception] = SourceFileError,
                 folder_ok: bool = False, what: str = "") -> os.stat_result:
    """The ``stat`` of ``path`` if it is a regular file (or, with ``folder_ok``, a folder);
    otherwise ``error`` naming the path and what it is (``what``: "no such <what>")."""
    st = _stat(path, error, what or ("file or folder" if folder_ok else "file"))
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return st
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a plain file")
    raise error(f"{path}: {kind}, not a regular file; name a weights file")


def holds(source: Path, target: Path) -> bool:
    """Whether writing ``target`` changes ``source`` (both resolved): the same path, or a path
    inside a source folder (a diffusers folder, a run folder's artifacts)."""
    return target == source or source in target.parents


def resolved(path: str | Path, error: type[Exception] = SourceFileError) -> Path:
    """``Path(path).resolve()`` with a symlink loop reported as ``error`` naming the path."""
    try:
        return Path(path).resolve()
    except RuntimeError:  # Python < 3.13 raises this for a loop; newer ones raise OSError
        raise error(f"{path}: a symlink loop (the link points back to itself); "
                    "name the real file") from None
    except OSError as exc:
        raise error(f"{path}: cannot be resolved ({exc.strerror})") from None
