"""Outputs that appear complete under their name or not at all: small files, files a library
writes by name, folders, and scratch folders.

Every temporary name here is a partial name (``partial_files``): the writer's PID, start time
and host. A process killed while writing cannot remove what it left, so each of these first
removes, from the folder it writes into, the partials of writers that are gone.

Example:
    >>> atomic_write_text(Path("run/config.yaml"), text)                  # doctest: +SKIP
    >>> with atomic_path(Path("world/unet.safetensors")) as tmp:          # doctest: +SKIP
    ...     save_file(state, str(tmp))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from merge_backend.file_sinks import AtomicWriter, move_into_place, sync_folder
from merge_backend.partial_files import ASIDE, partial_name, pause_point, remove_stale_partials


def _umask() -> int:
    """This process's umask, read without changing it (Linux's /proc), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give the files (and folders) at ``path`` the modes the umask gives new ones: libraries
    that write by name (safetensors' ``save_file``, diffusers' ``save_pretrained``) make 0600
    files, which another user or service could not read."""
    mask = _umask()
    paths = [Path(path)]
    if paths[0].is_dir():
        paths += sorted(paths[0].rglob("*"))
    for p in paths:
        if p.is_symlink():
            continue
        wanted = (0o777 if p.is_dir() else 0o666) & ~mask
        if p.stat().st_mode & 0o777 != wanted:
            os.chmod(p, wanted)


def atomic_write_bytes(path: Path, data: bytes, replace: bool = True) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place
    (``replace``: see ``move_into_place``)."""
    with AtomicWriter(Path(path), replace=replace) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str, replace: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), replace)


@contextlib.contextmanager
def atomic_path(target: Path, thread: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` for a library that writes by file name
    (``torch.save``, safetensors' ``save_file``, ``shutil.copyfile``); once the block ends the
    file is synced and renamed onto ``target``. On an exception it is removed and ``target`` is
    left as it was. ``thread``: threads of one process may write ``target`` at once (the name
    then carries the thread's id too). ``replace``: see ``move_into_place``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target.parent)
    name = f"{target.name}.t{threading.get_ident()}" if thread else target.name
    tmp = target.with_name(partial_name(name))
    try:
        yield tmp
        follow_umask(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        move_into_place(tmp, target, replace)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(target.parent)


@contextlib.contextmanager
def atomic_folder(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it takes ``target``'s name.

    On an exception the temporary folder is removed and ``target`` is left as it was. With
    ``replace``, an existing ``target`` (the caller has checked overwriting is wanted) is moved
    aside first and deleted only after the new folder is in place; without it, an existing
    ``target`` is kept and the new folder removed (``move_into_place``).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target.parent)
    tmp = target.with_name(partial_name(target.name))
    tmp.mkdir()  # the name is this process's alone
    try:
        yield tmp
        follow_umask(tmp)
        if not replace:
            move_into_place(tmp, target, replace=False)
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the replaced folder is set aside under a partial name: if this process is killed while
    # deleting it (a diffusers folder takes a while), the next writer removes what is left; if
    # killed before the new folder took its place, the next writer puts it back
    old = target.with_name(partial_name(target.name + ASIDE))
    if target.exists():
        os.replace(target, old)
        pause_point("between-renames")
    os.replace(tmp, target)
    pause_point("removing-replaced")
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_folder(beside: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside the output ``beside`` (on its disk) for files
    that must not outlive the block; it is removed when the block ends, however it ends."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(beside.parent)
    tmp = beside.with_name(partial_name(f"{beside.name}.scratch"))
    tmp.mkdir()  # the name is this process's alone
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
