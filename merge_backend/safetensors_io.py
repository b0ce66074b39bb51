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
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .file_sinks import AtomicWriter

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a readable .safetensors file; the message names the file."""


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
    """Parse and check a safetensors header: tensor table and ``__metadata__``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw_len)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: not a safetensors file, or truncated (header says "
                                   f"{n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsError(
                f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    table: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            start, end = (base + int(o) for o in entry["data_offsets"])
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsError(f"{path}: bad header entry for tensor {key!r}: {exc}") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {key!r} has {end - start} bytes for shape "
                                   f"{list(shape)} {entry['dtype']}")
        if end > size:
            raise SafetensorsError(f"{path}: truncated: tensor {key!r} ends at byte {end}, "
                                   f"the file has {size}")
        table[key] = TensorInfo(dtype, shape, start, end)
    return table, {str(k): str(v) for k, v in metadata.items()}


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
                       finalize: Callable[[], Mapping[str, str]] | None = None) -> None:
    """Write ``planned`` tensors (values arriving one by one, in order) atomically to ``target``.

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
    with AtomicWriter(target, direct=True) as sink:
        sink.write(struct.pack("<Q", len(blob)) + blob)
        count = 0
        for p, value in zip(planned, values, strict=True):
            if value.dtype != p.dtype or tuple(value.shape) != p.shape:
                raise ValueError(f"internal: {p.key} planned {p.dtype}{list(p.shape)}, "
                                 f"got {value.dtype}{list(value.shape)}")
            if p.nbytes:
                sink.write_tensor(value)
            count += 1
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
