"""Checkpoints as the users hold them: original-layout single files, read lazily.

``open_checkpoint(path)`` accepts a ``.safetensors`` file (read one tensor at a time), a
``.ckpt`` / ``.pt`` / ``.pth`` file (only through ``torch.load(weights_only=True)``: a pickle
that would run code is refused, never run) or a diffusers pipeline folder (converted to the
original layout). It detects the architecture and hands out tensors by original key.

Example:
    >>> ckpt = open_checkpoint("model.safetensors")        # doctest: +SKIP
    >>> ckpt.arch.name, len(ckpt.keys())                    # doctest: +SKIP
    ('sd1', 1131)
"""

from __future__ import annotations

import stat
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .architectures import Architecture, Layout, detect_layout
from .diffusers_folder import DiffusersFolderError, read_diffusers_folder
from .safetensors_io import MappedFile, SafetensorsError, TensorInfo, read_header
from .source_files import check_source

CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A source that cannot be used; the message names the file and, where known, the key."""


class Checkpoint:
    """A read-only view of one checkpoint: keys, shapes, dtypes and tensors on demand."""

    def __init__(self, path: Path, arch: Architecture, shapes: Mapping[str, tuple[int, ...]],
                 dtypes: Mapping[str, torch.dtype], loader, metadata: Mapping[str, str],
                 releaser=None, layout: Layout | None = None):
        self.path = path
        self.arch = arch
        self.layout = layout  # another layout it is stored in (BFL's bare Flux file), or None
        # Keys are exposed in their canonical (CheckpointSave) spelling; old-layout files keep
        # their stored names underneath.
        self._stored = {arch.canonical_key(k, layout): k for k in shapes}
        self._shapes = {c: tuple(shapes[k]) for c, k in self._stored.items()}
        self._dtypes = {c: dtypes[k] for c, k in self._stored.items()}
        self._loader = loader
        self._releaser = releaser
        self.metadata = dict(metadata)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def model_keys(self) -> list[str]:
        """Keys CheckpointSave would keep (no schedules, no EMA copies)."""
        return [k for k in self._shapes if self.arch.is_model_key(k)]

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def nbytes(self, keys=None) -> int:
        keys = self._shapes if keys is None else keys
        total = 0
        for k in keys:
            n = self._dtypes[k].itemsize
            for s in self._shapes[k]:
                n *= s
            total += n
        return total

    def get(self, key: str, *, check_finite: bool = True) -> torch.Tensor:
        """The tensor stored under ``key`` (CPU, stored dtype). NaN/inf raise CheckpointError."""
        try:
            tensor = self._loader(self._stored[key])
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None
        if check_finite and not all_finite(tensor):
            raise CheckpointError(f"{self.path}: tensor {key!r} holds NaN or infinite values; "
                                  "the file is damaged or was saved from a diverged model")
        return tensor

    def check_finite(self, keys: Iterable[str]) -> None:
        """Read every tensor of ``keys`` once and raise ``CheckpointError`` naming the first
        that holds NaN or inf — before a merge writes anything. About 0.25 s per 2 GB of
        fp16 from the page cache (benchmarks/merge_cli.py measures it inside the merge)."""
        for key in keys:
            self.get(key)
            self.release(key)

    def release(self, key: str) -> None:
        """Done with ``key`` for now: let its memory go (a no-op for in-memory sources)."""
        if self._releaser is not None:
            self._releaser(self._stored[key])

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, arch={self.arch.name}, keys={len(self._shapes)})"


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in a tensor. A sum is a fast screen (NaN and inf propagate through it);
    only a non-finite sum (or an overflowing one) pays for the exact element-wise check."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if torch.isfinite(tensor.sum()):
        return True
    return bool(torch.isfinite(tensor).all())


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint lazily and detect its architecture (see module docstring)."""
    path = Path(path)
    st = check_source(path, error=CheckpointError, folder_ok=True)  # FIFOs, loops, devices
    if stat.S_ISDIR(st.st_mode):
        return _open_diffusers_folder(path)
    if path.suffix.lower() in CKPT_SUFFIXES:
        return _open_pickle(path)
    return _open_safetensors(path)


def _open_safetensors(path: Path) -> Checkpoint:
    try:
        table, metadata = read_header(path)
    except SafetensorsError as exc:
        raise CheckpointError(str(exc)) from None
    arch, layout = _detect(table.keys(), path)
    mapped = MappedFile(path)

    def load(key: str, _t: Mapping[str, TensorInfo] = table) -> torch.Tensor:
        try:
            return mapped.tensor(_t[key])
        except SafetensorsError as exc:
            raise CheckpointError(str(exc)) from None

    return Checkpoint(path, arch, {k: v.shape for k, v in table.items()},
                      {k: v.dtype for k, v in table.items()}, load, metadata,
                      releaser=lambda key: mapped.release(table[key]), layout=layout)


def _open_diffusers_folder(path: Path) -> Checkpoint:
    """A diffusers pipeline folder, converted to the original layout and held in memory."""
    try:
        arch, tensors = read_diffusers_folder(path)
    except DiffusersFolderError as exc:
        raise CheckpointError(str(exc)) from None
    return Checkpoint(path, arch, {k: tuple(v.shape) for k, v in tensors.items()},
                      {k: v.dtype for k, v in tensors.items()}, tensors.__getitem__, {})


def _open_pickle(path: Path) -> Checkpoint:
    try:
        # mmap reads only torch.save's zip format (PyTorch >= 1.6); the older one is read whole.
        # A plain pickle makes torch warn about its protocol before refusing it: the refusal says it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True,
                             mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - whatever a damaged or hostile pickle raises
        # torch's message opens with a general paragraph; what was refused follows its marker
        _, marked, rest = str(exc).partition("WeightsUnpickler error:")
        lines = [line.strip() for line in (rest if marked else str(exc)).splitlines()]
        first = next((line for line in lines if line), type(exc).__name__)
        raise CheckpointError(
            f"{path}: refused: this .ckpt is not a plain weights file that loads with "
            f"torch.load(weights_only=True) ({first}). Convert it to .safetensors with a tool "
            "you trust; mergesearch never unpickles arbitrary code.") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    arch, layout = _detect(tensors.keys(), path)
    return Checkpoint(path, arch, {k: tuple(v.shape) for k, v in tensors.items()},
                      {k: v.dtype for k, v in tensors.items()}, tensors.__getitem__, {},
                      layout=layout)


def _detect(keys, path: Path) -> tuple[Architecture, Layout | None]:
    try:
        return detect_layout(keys, source=str(path))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


