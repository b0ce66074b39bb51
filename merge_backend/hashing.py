"""sha256 of checkpoints, remembered between runs.

Every merged file records its sources' sha256, and hashing a 2–7 GB checkpoint keeps a core
busy for 1–4 s. Users merge the same sources again and again, and every worker of a study
opens them, so a digest is kept in a small JSON cache (A1111 keeps one for the same reason)
and reused only while the file's identity and change stamps are those it was computed from:
device, inode, size, mtime and ctime in nanoseconds. ctime moves on every write and cannot be
set back by a user, so an edited or replaced file is hashed anew. (On Windows ctime is the
creation time; there mtime and size are what catch an edit.)

``MERGESEARCH_HASH_CACHE`` names the cache file, or ``off`` to hash every time; the default is
``$XDG_CACHE_HOME/mergesearch/sha256.json`` (``~/.cache/…``). A cache that cannot be read or
written is ignored: it only saves time, it never decides a digest on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
from pathlib import Path

from .atomic_files import atomic_path

CACHE_ENV = "MERGESEARCH_HASH_CACHE"
_WINDOW = 1 << 26  # bytes hashed per mapped window before its pages are let go


def sha256_of(path: str | Path) -> str:
    """sha256 of a file's bytes (of every file, sorted, for a folder); files use the cache."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            _hash_into(digest, file)
        return digest.hexdigest()
    cache = cache_path()
    if cache is None:
        return _file_digest(path)
    key, stamp = str(path.resolve()), _stamp(path)
    cached = _cached(_read(cache), key, stamp)
    if cached is not None:
        return cached
    value = _file_digest(path)
    if _stamp(path) == stamp:  # unchanged while it was read: the digest is the file's
        entries = _read(cache)  # another process may have added entries meanwhile
        entries[key] = {"stamp": stamp, "sha256": value}
        _write(cache, entries)
    return value


def cached_sha256(paths) -> bool:
    """Whether every file's digest is in the cache (so hashing them costs nothing)."""
    cache = cache_path()
    if cache is None:
        return False
    entries = _read(cache)
    return all(path.is_file() and _cached(entries, str(path.resolve()), _stamp(path)) is not None
               for path in map(Path, paths))


def cache_path() -> Path | None:
    """The cache file, or None when ``MERGESEARCH_HASH_CACHE=off``."""
    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mergesearch" / "sha256.json"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    _hash_into(digest, path)
    return digest.hexdigest()


def _hash_into(digest, path: Path) -> None:
    """Feed a file to ``digest`` through a read-only map: no copy into a read buffer, and each
    window's pages leave this process once hashed (they stay in the page cache)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            # No MADV_SEQUENTIAL: it lets the kernel drop pages soon after they are read, and
            # the merge that hashes a source reads the same pages again right after.
            dontneed = getattr(mmap, "MADV_DONTNEED", None)
            with memoryview(mapped) as view:
                for start in range(0, size, _WINDOW):
                    with view[start:start + _WINDOW] as window:
                        digest.update(window)  # hashlib releases the GIL on large buffers
                    if dontneed is not None:
                        mapped.madvise(dontneed, start, min(_WINDOW, size - start))


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _cached(entries: dict, key: str, stamp: list[int]) -> str | None:
    """The cached digest of the file at ``key`` if it was computed from this very ``stamp``."""
    entry = entries.get(key)
    if not isinstance(entry, dict) or entry.get("stamp") != stamp:
        return None
    value = entry.get("sha256")
    ok = isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    return value if ok else None


def _read(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(cache: Path, entries: dict) -> None:
    # readers see the old file or the new one, never half of one
    with contextlib.suppress(OSError), atomic_path(cache, thread=True) as tmp:
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
