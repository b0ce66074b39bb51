"""The sha256 of sources: right digests, a cache reused only for the unchanged file."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from merge_backend.hashing import CACHE_ENV, cache_path, sha256_of


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "sha256.json"
    monkeypatch.setenv(CACHE_ENV, str(path))
    return path


def _plant(cache, file, digest: str) -> None:
    entries = json.loads(cache.read_text())
    entries[str(file.resolve())]["sha256"] = digest
    cache.write_text(json.dumps(entries))


def test_digests_of_files_empty_files_and_folders(tmp_path, cache):
    data = os.urandom(3 * (1 << 20) + 17)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.bin").write_bytes(data)
    (tmp_path / "m" / "b.bin").write_bytes(b"")
    (tmp_path / "m" / "c.bin").write_bytes(b"tail")
    assert sha256_of(tmp_path / "m" / "a.bin") == hashlib.sha256(data).hexdigest()
    assert sha256_of(tmp_path / "m" / "b.bin") == hashlib.sha256(b"").hexdigest()
    assert sha256_of(tmp_path / "m") == hashlib.sha256(data + b"tail").hexdigest()


def test_the_cache_is_reused_for_the_unchanged_file_only(tmp_path, cache):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x" * 4096)
    real = hashlib.sha256(b"x" * 4096).hexdigest()
    assert sha256_of(file) == real
    assert json.loads(cache.read_text())[str(file.resolve())]["sha256"] == real
    planted = "f" * 64
    _plant(cache, file, planted)
    assert sha256_of(file) == planted  # read from the cache, not hashed again
    # Same size, mtime set back: the ctime still moved, so the file is hashed anew.
    st = file.stat()
    file.write_bytes(b"y" * 4096)
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_of(file) == hashlib.sha256(b"y" * 4096).hexdigest()


def test_a_replaced_file_is_hashed_anew(tmp_path, cache):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"a" * 100)
    sha256_of(file)
    _plant(cache, file, "0" * 64)
    other = tmp_path / "other"
    other.write_bytes(b"b" * 100)
    os.replace(other, file)  # a new inode under the same name
    assert sha256_of(file) == hashlib.sha256(b"b" * 100).hexdigest()


def test_off_and_broken_caches_never_decide_a_digest(tmp_path, cache, monkeypatch):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"z" * 10)
    real = hashlib.sha256(b"z" * 10).hexdigest()
    cache.parent.mkdir()
    cache.write_text("{not json")
    assert sha256_of(file) == real
    assert json.loads(cache.read_text())[str(file.resolve())]["sha256"] == real  # rewritten
    _plant(cache, file, "e" * 64)
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_path() is None
    assert sha256_of(file) == real
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a-file" / "sha256.json"))
    assert sha256_of(file) == real  # a cache that cannot be written is skipped


def test_threads_hashing_at_once_leave_one_readable_cache(tmp_path, cache):
    """Each thread writes the cache under its own temporary name; the folder ends with the
    cache alone, and what it holds are right digests."""
    from concurrent.futures import ThreadPoolExecutor

    files = []
    for i in range(24):
        files.append(tmp_path / f"m{i}.safetensors")
        files[-1].write_bytes(os.urandom(4096 + i))
    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(sha256_of, files))
    assert digests == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert os.listdir(cache.parent) == ["sha256.json"]
    entries = json.loads(cache.read_text())
    by_path = {str(f.resolve()): d for f, d in zip(files, digests)}
    assert entries and all(e["sha256"] == by_path[p] for p, e in entries.items())
