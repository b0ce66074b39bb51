"""Scorer config fields that name files: the marker that resolves them next to the YAML, and
the checks that a file is what its field says (before any model is loaded).

A config field typed ``ConfigPath`` (or ``Annotated[str, ConfigFile(suffixes=(".json",))]`` for
a name-or-file field) is a file: a relative path in a study config resolves against the config
file's folder, and errors name the field.

Example:
    >>> class MyConfig(ScorerConfig):                                    # doctest: +SKIP
    ...     weights: ConfigPath
    ...     labels: ConfigPath | None = None
    >>> sorted(file_fields(MyConfig))                                    # doctest: +SKIP
    ['labels', 'weights']
"""

from __future__ import annotations

import json
import struct
import types
import typing
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel


@dataclass(frozen=True)
class ConfigFile:
    """Marks a config field that names a file (or, ``folder=True``, a folder). ``suffixes``:
    only values ending so are files (an open_clip ``model`` is a name, or a config ``.json``)."""

    suffixes: tuple[str, ...] = ()
    folder: bool = False

    def applies(self, value: Any) -> bool:
        return isinstance(value, (str, Path)) and bool(str(value)) \
            and (not self.suffixes or str(value).endswith(self.suffixes))

    def problem(self, field: str, path: Path) -> str:
        """Why ``path`` cannot be this field's file or folder ("" when it can)."""
        what = "folder" if self.folder else "file"
        if not path.exists():
            return f"{field} {what} {path} does not exist"
        if path.is_dir() != self.folder:
            return f"{field} {path} is not a {what}"
        return ""


ConfigPath = Annotated[Path, ConfigFile()]
ConfigFolder = Annotated[Path, ConfigFile(folder=True)]


def _marker(annotation: Any) -> ConfigFile | None:
    if typing.get_origin(annotation) is Annotated:
        found = [m for m in typing.get_args(annotation)[1:] if isinstance(m, ConfigFile)]
        if found:
            return found[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _marker(arg)) is not None:
                return found
    return None


def file_fields(config: type[BaseModel]) -> dict[str, ConfigFile]:
    """The fields of a config class that name files, with their markers."""
    out = {}
    for name, info in config.model_fields.items():
        marker = next((m for m in info.metadata if isinstance(m, ConfigFile)), None)
        marker = marker or _marker(info.annotation)
        if marker is not None:
            out[name] = marker
    return out


def require_file(path: Path, field: str, formats: Sequence[str]) -> None:
    """Check ``path`` exists and is a readable file of one of ``formats``.

    Formats: ``safetensors`` (header parses), ``torch`` (a ``torch.save`` zip archive),
    ``open_clip_config`` (JSON with embed_dim / vision_cfg / text_cfg), ``json``.
    """
    if not path.exists():
        raise ValueError(f"{field} file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{field} {path} is not a file")
    problems = [problem for fmt in formats if (problem := _FORMAT_CHECKS[fmt](path))]
    if len(problems) == len(formats):
        raise ValueError(f"{field} file {path} is not {' or '.join(formats)}: "
                         f"{'; '.join(problems)}")


def require_dir(path: Path, field: str, files: Sequence[str]) -> None:
    """Check ``path`` is a folder holding every name in ``files``."""
    if not path.is_dir():
        raise ValueError(f"{field} folder {path} does not exist")
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{field} folder {path} lacks {', '.join(missing)}")


def _safetensors_problem(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "too short for a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > path.stat().st_size - 8:
            return "header length exceeds the file size"
        try:
            json.loads(f.read(length))
        except ValueError:
            return "header is not JSON"
    return ""


def _torch_problem(path: Path) -> str:
    if zipfile.is_zipfile(path):
        return ""
    with path.open("rb") as f:
        legacy = f.read(1) == b"\x80"  # a pre-1.6 torch.save pickle starts with PROTO
    return "" if legacy else "not a torch.save archive"


def _open_clip_config_problem(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "not JSON"
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in data]
    return f"missing {', '.join(missing)}" if missing else ""


def _json_problem(path: Path) -> str:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "not JSON"
    return ""


_FORMAT_CHECKS: dict[str, Callable[[Path], str]] = {
    "safetensors": _safetensors_problem,
    "torch": _torch_problem,
    "open_clip_config": _open_clip_config_problem,
    "json": _json_problem,
}
