"""Partial files: the temporary names outputs are written under, and the clean-up of those
that killed writers left behind.

``AtomicWriter`` (file_sinks.py) writes ``target`` as ``.<target>.<pid>-<start>@<host>.partial``
(``start``: the process's start time in clock ticks since boot, from /proc) and renames it into
place when it is complete. A process killed while writing (SIGKILL, power loss) cannot remove
its partial file, so every writer first removes, from the folder it writes into, the partials
whose process is gone: written on this host, and the PID is dead, a zombie, or now a different
process (another start time: the PID was reused). The temporary folders of ``atomic_files`` (a
diffusers export's folder, a LoRA export's scratch folder) are named and removed the same way.
Partials of other hosts (a folder shared over the network), of live writers, and every file not
named this way are left alone. Partials of the older naming ``.<target>.<pid>.partial`` (no
start time, no host) are removed when their PID is dead and their target is a ``.safetensors``
file, the large outputs that used it. A dead writer's folder set aside by ``atomic_folder``
(target ``<name>.old``: the output it was replacing) is put back as ``<name>`` when nothing took
that name (the writer died between its two renames), else removed.

Example:
    >>> partial_name("out.safetensors")                  # doctest: +SKIP
    '.out.safetensors.4242-123456@myhost.partial'
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

PAUSE_ENV = "MERGESEARCH_PAUSE_AT"
ASIDE = ".old"  # atomic_folder's replaced folder: partial_name(name + ASIDE)
NAME_MAX = 255  # bytes in one file name on ext4, XFS, btrfs, tmpfs, APFS and NTFS
# Our own temporary names; the older ``.<target>.<pid>.partial`` (no start time, no host) too.
_PARTIAL = re.compile(r"^\.(?P<target>.+)\.(?P<pid>[0-9]+)"
                      r"(?:-(?P<start>[0-9]+)@(?P<host>[A-Za-z0-9_-]+))?\.partial$")


def pause_point(moment: str) -> None:
    """A test hook, and the only reader of ``MERGESEARCH_PAUSE_AT``: when it names ``moment``
    (``mid-stream``, ``before-rename``, ``after-rename``, ``between-renames``,
    ``removing-replaced``), say so on stderr and sleep until killed. The crash tests SIGKILL a
    writer at a named moment this way."""
    if os.environ.get(PAUSE_ENV) != moment:
        return
    print(f"mergesearch: paused at {moment} ({PAUSE_ENV})", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:64] or "host"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name in (...) may hold spaces
        return fields[0].decode(), int(fields[19])  # fields 3 (state) and 22 (starttime)
    except (OSError, IndexError, ValueError):
        return None


def partial_name(target_name: str) -> str:
    """The temporary name this process writes ``target_name`` under (see module docstring)."""
    found = _proc_stat(os.getpid())
    suffix = f".{os.getpid()}-{found[1] if found else 0}@{_host()}.partial"
    room = NAME_MAX - 1 - len(suffix.encode())  # a long target name is cut, not refused
    return f".{target_name.encode()[:room].decode(errors='ignore')}{suffix}"


def output_of(path: str | Path) -> Path:
    """The output a partial name is written for; any other path as it is."""
    path = Path(path)
    match = _PARTIAL.match(path.name)
    return path.with_name(match["target"]) if match else path


def process_gone(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` of this host (started at ``start``, when known) has ended: no
    such PID, a zombie its parent has not reaped yet, or the PID now another process's. Used
    for the writers of partial files and for the workers of running trials (search.liveness)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the PID exists
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    found = _proc_stat(pid)
    if found is None:
        return False  # no /proc (macOS): a live PID is kept
    state, now_start = found
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return True
    return bool(start) and now_start != start  # the PID now belongs to another process


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the partial files of dead writers of this host from ``folder`` (see the module
    docstring); returns what was removed. Files that are not ours are never touched."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return []
    removed, host = [], _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if match is None:
            continue
        is_folder = entry.is_dir(follow_symlinks=False)
        if not (entry.is_file(follow_symlinks=False) or is_folder and match["host"]):
            continue  # a folder is ours only under the full name (atomic_files' folders)
        if match["host"] is None and not match["target"].endswith(".safetensors"):
            continue  # an old-style name is only ours for the large outputs that used it
        if match["host"] not in (None, host):
            continue  # another machine's writer: we cannot tell whether it is alive
        start = int(match["start"]) if match["start"] else None
        if not process_gone(int(match["pid"]), start):
            continue
        replaced = Path(folder) / match["target"].removesuffix(ASIDE)
        try:
            if is_folder and match["target"].endswith(ASIDE) and not replaced.exists():
                os.rename(entry.path, replaced)  # its new output never came: the old one back
                continue
            shutil.rmtree(entry.path) if is_folder else os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed
