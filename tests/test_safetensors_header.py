"""The header reader accepts exactly the files the safetensors library itself accepts.

Each file is built by hand, header bytes included; the oracle is ``safetensors.safe_open``
(the Rust crate's own rules). Where mergesearch is stricter on purpose, the test says so.
"""

from __future__ import annotations

import json
import struct

import pytest
from safetensors import safe_open

from merge_backend.safetensors_io import SafetensorsError, read_header

F32x2 = {"dtype": "F32", "shape": [2]}


def raw(header, data: bytes = b"", pad: int = 0) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * pad
    return struct.pack("<Q", len(blob)) + blob + data


CASES = {
    # valid
    "empty": raw({}),
    "metadata only": raw({"__metadata__": {"format": "pt"}}),
    "one tensor": raw({"a": {**F32x2, "data_offsets": [0, 8]}}, bytes(8)),
    "listed out of order": raw({"b": {**F32x2, "data_offsets": [8, 16]},
                                "a": {**F32x2, "data_offsets": [0, 8]}}, bytes(16)),
    "zero-size tensor between": raw({"a": {**F32x2, "data_offsets": [0, 8]},
                                     "z": {"dtype": "F16", "shape": [0, 3], "data_offsets": [8, 8]},
                                     "b": {**F32x2, "data_offsets": [8, 16]}}, bytes(16)),
    "scalar": raw({"s": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]}}, bytes(8)),
    "header padded with spaces": raw({"a": {**F32x2, "data_offsets": [0, 8]}}, bytes(8), pad=5),
    "metadata null": raw({"__metadata__": None, "a": {**F32x2, "data_offsets": [0, 8]}}, bytes(8)),
    # invalid
    "overlap": raw({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [0, 8]}},
                   bytes(8)),
    "partial overlap": raw({"a": {**F32x2, "data_offsets": [0, 8]},
                            "b": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)),
    "gap": raw({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}},
               bytes(20)),
    "leading gap": raw({"a": {**F32x2, "data_offsets": [4, 12]}}, bytes(12)),
    "bytes after the last tensor": raw({"a": {**F32x2, "data_offsets": [0, 8]}}, bytes(9)),
    "data truncated": raw({"a": {**F32x2, "data_offsets": [0, 8]}}, bytes(7)),
    "length is not dtype x shape": raw({"a": {"dtype": "F32", "shape": [3],
                                              "data_offsets": [0, 8]}}, bytes(8)),
    "negative offset": raw({"a": {**F32x2, "data_offsets": [-8, 0]}}, bytes(8)),
    "float offsets": raw({"a": {**F32x2, "data_offsets": [0.0, 8.0]}}, bytes(8)),
    "begin after end": raw({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8)),
    "three offsets": raw({"a": {**F32x2, "data_offsets": [0, 8, 8]}}, bytes(8)),
    "negative dimension": raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}}),
    "missing shape": raw({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8)),
    "metadata is a list": raw({"__metadata__": ["a", "b"]}),
    "metadata value is a number": raw({"__metadata__": {"a": 1}}),
    "not JSON": raw(b"{this is not json}"),
    "not an object": raw(b"[1, 2, 3]"),
    "not UTF-8": raw(b'{"\xff": 1}'),
    "header longer than the file": struct.pack("<Q", 1000) + b"{}",
    "shorter than 8 bytes": b"\x02\x00",
}


def ours(path) -> bool:
    """Whether read_header accepts the file; a refusal is a SafetensorsError naming it (any
    other exception fails the test: it would be a traceback for the user)."""
    try:
        read_header(path)
    except SafetensorsError as exc:
        assert str(path) in str(exc)
        return False
    return True


def library(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception:  # noqa: BLE001 - the library's own error types
        return False
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_header_rules_match_the_safetensors_library(tmp_path, name):
    path = tmp_path / "case.safetensors"
    path.write_bytes(CASES[name])
    assert ours(path) == library(path), name


def test_stricter_than_the_library_on_purpose(tmp_path):
    # A tensor named twice: the library keeps the last entry; which one was meant is unknown.
    entry = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    path = tmp_path / "twice.safetensors"
    path.write_bytes(raw(f'{{"a":{entry},"a":{entry}}}'.encode(), bytes(8)))
    assert library(path)
    with pytest.raises(SafetensorsError, match="'a' twice"):
        read_header(path)
