"""Reading and writing .safetensors one tensor at a time.

The safetensors library maps whole files into memory, so every tensor touched stays resident.
A merge streams: it reads one tensor from each source, writes one tensor out, and forgets both.
This module does that with a copy-on-write map whose pages are handed back after each tensor,
and a header written up front, so peak memory stays near the size of the largest tensor group
rather than the size of the files. The bytes go out through ``file_sinks`` (atomic, on the disk
before the file appears, O_DIRECT where the file system allows it).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .file_sinks import AtomicWriter
from .partial_files import pause_point
from .source_files import check_source

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# The safetensors crate's own rules (safetensors/src/tensor.rs, read_metadata and validate):
# a header of at most 100 000 000 bytes of UTF-8 JSON; tensors sorted by offset tile the data
# section from byte 0 with no gap and no overlap, each exactly numel x dtype size long, and
# the last one ends where the file ends; ``__metadata__`` maps strings to strings.
MAX_HEADER = 100_000_000
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


class SafetensorsError(ValueError):
    """A file that is not a readable .safetensors file; the message names the file and, where
    one is at fault, the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: tensor table and ``__metadata__``.

    Every rule of the format is checked before a tensor is read (see ``MAX_HEADER``); a file
    that breaks one raises ``SafetensorsError`` naming the file and the tensor.
    """
    path = Path(path)
    check_source(path, error=SafetensorsError)  # a FIFO would block the read below forever
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: not a safetensors file, or truncated (header says "
                                   f"{n} bytes, file has {size})")
        header = _parse_json(path, f.read(n))
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map names to strings, it is "
                               f"{_describe(metadata)}")
    base = 8 + n
    table = {key: _tensor_info(path, key, entry, base) for key, entry in header.items()}
    _check_layout(path, table, base, size)
    return table, metadata


class _Duplicate(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _parse_json(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs)
    except UnicodeDecodeError:
        raise SafetensorsError(f"{path}: not a safetensors file (header is not UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise SafetensorsError(
            f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    except _Duplicate as exc:
        raise SafetensorsError(f"{path}: the header names {exc.args[0]!r} twice") from None
    except RecursionError:  # the format nests 3 deep; serde_json in the crate stops at 128
        raise SafetensorsError(f"{path}: not a safetensors file (its header JSON nests "
                               "thousands of levels deep)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header


def _describe(value: object) -> str:
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        return type(value).__name__
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_info(path: Path, key: str, entry: object, base: int) -> TensorInfo:
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict) or any(f not in entry for f in _TENSOR_FIELDS):
        raise SafetensorsError(f"{where}: its header entry must be an object with dtype, shape "
                               f"and data_offsets, it is {_describe(entry)}")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise SafetensorsError(f"{where}: dtype {entry['dtype']!r} is not one of "
                               f"{', '.join(DTYPES)}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise SafetensorsError(f"{where}: shape {_describe(shape)} is not a list of "
                               "non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
            or not 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{where}: data_offsets {_describe(offsets)} are not two "
                               "integers 0 <= begin <= end")
    numel = 1
    for s in shape:
        numel *= s
    if offsets[1] - offsets[0] != numel * dtype.itemsize:
        raise SafetensorsError(f"{where}: has {offsets[1] - offsets[0]} bytes for shape {shape} "
                               f"{entry['dtype']} ({numel * dtype.itemsize} expected)")
    return TensorInfo(dtype, tuple(shape), base + offsets[0], base + offsets[1])


def _check_layout(path: Path, table: Mapping[str, TensorInfo], base: int, size: int) -> None:
    """Tensors tile the data section exactly: from its first byte to the end of the file, no
    gap, no overlap (two tensors sharing bytes would read each other's values)."""
    end, previous = base, None
    for key, info in sorted(table.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start < end:
            other = table[previous]
            raise SafetensorsError(
                f"{path}: tensor {key!r} (data bytes {info.start - base}–{info.end - base}) "
                f"overlaps tensor {previous!r} (data bytes {other.start - base}–{other.end - base})"
                "; each tensor needs bytes of its own")
        if info.start > end:
            raise SafetensorsError(
                f"{path}: tensor {key!r} starts {info.start - end} byte(s) after the end of "
                f"{'the header' if previous is None else repr(previous)}; tensors must fill the "
                "data section without gaps")
        end, previous = info.end, key
    if end > size:
        raise SafetensorsError(f"{path}: truncated: tensor {previous!r} ends at byte {end}, "
                               f"the file has {size}")
    if end < size:
        raise SafetensorsError(f"{path}: {size - end} byte(s) after the last tensor"
                               f"{'' if previous is None else f' {previous!r}'}; the file was "
                               "damaged or appended to")


class MappedFile:
    """A copy-on-write memory map of a safetensors file: tensors are views of the page cache
    (no read copy), and ``release`` hands a tensor's pages back so they stop counting as
    this process's memory. A released range reads again from the file if touched; writes to a
    view go to private pages and never reach the file."""

    def __init__(self, path: Path):
        import mmap

        self.path = path
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._page = mmap.PAGESIZE
        self._dontneed = getattr(mmap, "MADV_DONTNEED", None)

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if info.end > len(self.map):
            raise SafetensorsError(f"{self.path}: truncated while reading a tensor at byte "
                                   f"{info.start}")
        numel = info.nbytes // info.dtype.itemsize
        if info.start % info.dtype.itemsize:  # an odd offset cannot be viewed as this dtype
            return read_tensor(self.path, info)
        return torch.frombuffer(self.map, dtype=info.dtype, count=numel,
                                offset=info.start).reshape(info.shape)

    def release(self, info: TensorInfo) -> None:
        if self._dontneed is None or info.nbytes == 0:
            return
        start = info.start - info.start % self._page
        self.map.madvise(self._dontneed, start, info.end - start)


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """Read one tensor with a positioned read (no memory map, nothing kept resident)."""
    raw = torch.empty(info.nbytes, dtype=torch.uint8)  # not zero-filled, unlike bytearray
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    with open(path, "rb", buffering=0) as f:
        f.seek(info.start)
        got = f.readinto(memoryview(raw.numpy()))
    if got != info.nbytes:
        raise SafetensorsError(f"{path}: truncated while reading a tensor at byte {info.start}")
    return raw.view(info.dtype).reshape(info.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written: its name, dtype and shape, known before its values are."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * self.dtype.itemsize


def stream_safetensors(target: Path, planned: list[PlannedTensor], values: Iterator[torch.Tensor],
                       metadata: Mapping[str, str],
                       finalize: Callable[[], Mapping[str, str]] | None = None,
                       replace: bool = True) -> None:
    """Write ``planned`` tensors (values arriving one by one, in order) atomically to ``target``
    (``replace``: see ``file_sinks.move_into_place``).

    ``finalize``, called after the last tensor, returns {placeholder: value} replacements of
    equal length for the header (e.g. sha256 digests computed while the tensors streamed).
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for p in planned:
        header[p.key] = {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape),
                         "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with AtomicWriter(target, direct=True, replace=replace) as sink:
        sink.write(struct.pack("<Q", len(blob)) + blob)
        count = 0
        for p, value in zip(planned, values, strict=True):
            if value.dtype != p.dtype or tuple(value.shape) != p.shape:
                raise ValueError(f"internal: {p.key} planned {p.dtype}{list(p.shape)}, "
                                 f"got {value.dtype}{list(value.shape)}")
            if p.nbytes:
                sink.write_tensor(value)
            count += 1
            if count == len(planned) // 2:
                pause_point("mid-stream")
        if count != len(planned):
            raise ValueError("internal: fewer tensors than planned")
        if finalize is not None:
            final = blob
            for placeholder, value in finalize().items():
                if len(placeholder) != len(value):
                    raise ValueError("internal: a header placeholder changes length")
                final = final.replace(placeholder.encode(), value.encode())
            if final != blob:
                sink.patch(8, final)
