"""Atomic, durable output files: the O_DIRECT sink and the buffered one write the same bytes,
and a failure (in the caller or in the writer thread) leaves no file behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merge_backend.file_sinks import AtomicWriter, BufferedSink, DirectSink, open_sink

ROOT = Path(__file__).resolve().parents[1]


def _direct_possible(folder: Path) -> bool:
    try:
        DirectSink(folder / ".probe").close(ok=False)
    except OSError:
        return False
    finally:
        (folder / ".probe").unlink(missing_ok=True)
    return True


@pytest.fixture
def direct_folder(tmp_path):
    if not hasattr(os, "O_DIRECT") or not _direct_possible(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    return tmp_path


def _content(seed: int = 0) -> list:
    """Pieces of odd sizes: a header, tensors across staging buffers, an empty one."""
    g = torch.Generator().manual_seed(seed)
    return [b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"h" * 4093,
            torch.randn(3, 1001, generator=g).half(),
            torch.randint(0, 255, (20_000,), dtype=torch.uint8, generator=g),
            torch.empty(0),
            torch.randn(7, generator=g),
            torch.randn(50_000, generator=g).bfloat16()]


def _expected(pieces, patch: tuple[int, bytes]) -> bytes:
    raw = bytearray()
    for piece in pieces:
        raw += piece if isinstance(piece, bytes) else \
            piece.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    offset, data = patch
    raw[offset:offset + len(data)] = data
    return bytes(raw)


def _write(sink, pieces, patch) -> None:
    for piece in pieces:
        (sink.write if isinstance(piece, bytes) else sink.write_tensor)(piece)
    sink.patch(*patch)


@pytest.mark.parametrize("block", [8192, 1 << 20])
def test_direct_and_buffered_write_the_same_bytes(direct_folder, monkeypatch, block):
    # Small staging buffers make every piece cross buffers; the patch spans a block boundary.
    monkeypatch.setattr(DirectSink, "BLOCK", block)
    pieces, patch = _content(), (4090, b"PATCHED-ACROSS")
    with AtomicWriter(direct_folder / "d.bin", direct=True) as sink:
        assert isinstance(sink, DirectSink)
        _write(sink, pieces, patch)
    with AtomicWriter(direct_folder / "b.bin") as sink:
        assert isinstance(sink, BufferedSink)
        _write(sink, pieces, patch)
    expected = _expected(pieces, patch)
    assert (direct_folder / "d.bin").read_bytes() == expected  # padding cut off again
    assert (direct_folder / "b.bin").read_bytes() == expected
    assert sorted(os.listdir(direct_folder)) == ["b.bin", "d.bin"]


def test_block_multiple_length_has_no_padding(direct_folder, monkeypatch):
    monkeypatch.setattr(DirectSink, "BLOCK", 8192)
    data = torch.arange(4096 * 4, dtype=torch.int32)  # exactly 8 blocks of 8 KiB
    with AtomicWriter(direct_folder / "x.bin", direct=True) as sink:
        sink.write_tensor(data)
    assert (direct_folder / "x.bin").read_bytes() == data.numpy().tobytes()


@pytest.mark.parametrize("direct", [True, False])
def test_error_in_caller_leaves_target_untouched(tmp_path, direct):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), AtomicWriter(target, direct=direct) as sink:
        sink.write_tensor(torch.ones(100_000))
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_fallback_where_o_direct_is_refused():
    shm = Path("/dev/shm")
    if not hasattr(os, "O_DIRECT") or not shm.is_dir() or _direct_possible(shm):
        pytest.skip("no tmpfs that refuses O_DIRECT here")
    path = shm / f"mergesearch-sink-{os.getpid()}.bin"
    try:
        sink = open_sink(path, direct=True)
        assert isinstance(sink, BufferedSink)
        sink.write(b"abc")
        sink.close(ok=True)
        assert path.read_bytes() == b"abc"
    finally:
        path.unlink(missing_ok=True)


WRITE_PAST_LIMIT = """
import resource, signal, sys
from pathlib import Path
import torch
from merge_backend.file_sinks import AtomicWriter, DirectSink
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
DirectSink.BLOCK = 1 << 18
try:
    with AtomicWriter(Path(sys.argv[1]), direct=sys.argv[2] == "direct") as sink:
        for _ in range(16):
            sink.write_tensor(torch.ones(1 << 16))  # 256 KiB each, 4 MiB in all
except OSError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_failed_disk_write_leaves_nothing(tmp_path, mode):
    # A real write failure (the file-size limit stands in for a full disk), raised in the
    # writer thread for O_DIRECT, must surface and leave no file behind.
    out = subprocess.run([sys.executable, "-c", WRITE_PAST_LIMIT, str(tmp_path / "o.bin"), mode],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "too large" in out.stdout.lower()
    assert f"writing {tmp_path / 'o.bin'}" in out.stdout  # the message names the output
    assert os.listdir(tmp_path) == []



def test_a_long_output_name_still_gets_a_partial_file(tmp_path):
    # The temporary name adds PID, start time and host; the target name must still fit in 255.
    target = tmp_path / ("m" * 240 + ".safetensors")
    with AtomicWriter(target) as sink:
        sink.write(b"data")
        [partial] = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        assert len(partial.name.encode()) <= 255 and partial.name.startswith(".mmm")
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == [target.name]
