"""The scorer interface, scorer configs, and the registry ``build_scorer`` reads.

A scorer is anything with a ``name`` and ``score(images, prompts) -> Tensor[N]`` (higher is
better). Each kind of scorer has a pydantic config whose file paths are checked when the config
is made, so a missing or wrong file fails at start-up with the scorer and the path named,
before any model is loaded.

Example:
    >>> scorer = build_scorer({"kind": "sanity"}, device="cpu")
    >>> scorer.score(torch.zeros(1, 3, 8, 8), ["a cat"])
    tensor([-3.])
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

_MAX_DETAIL = 600  # characters of an underlying load error kept in ScorerError messages


class ScorerError(ValueError):
    """A scorer could not be configured or built; the message names the scorer and the file."""


@runtime_checkable
class Scorer(Protocol):
    """``score(images [N,3,H,W] in [0,1], prompts) -> Tensor[N]`` on CPU; higher is better.

    Example:
        >>> class Brightness:
        ...     name = "brightness"
        ...     def score(self, images, prompts):
        ...         return images.mean(dim=(1, 2, 3))
        >>> isinstance(Brightness(), Scorer)
        True
    """

    name: str

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


@runtime_checkable
class ExplainsScores(Protocol):
    """A scorer that can say, per image, why it scored low ("" when nothing is wrong)."""

    def explain(self, images: Tensor) -> list[str]: ...


@dataclass(frozen=True)
class ScoreNorm:
    """How one scorer's raw values enter the combined objective.

    Objectives are mapped affinely so the scorer's typical range ``(low, high)`` becomes
    ``(0, 1)``; penalties (``penalty=True``) keep their raw value and are added, not averaged.

    Example:
        >>> ScoreNorm(weight=2.0, low=15.0, high=35.0).normalise(torch.tensor([25.0]))
        tensor([0.5000])
    """

    weight: float = 1.0
    low: float = 0.0
    high: float = 1.0
    penalty: bool = False

    def normalise(self, raw: Tensor) -> Tensor:
        if self.penalty:
            return raw
        return (raw - self.low) / (self.high - self.low)


class ScorerConfig(BaseModel):
    """Fields every scorer config has. Subclasses add ``kind`` (a Literal) and their files.

    ``name`` labels the scorer's column in score cards (default: ``kind``); ``weight`` and
    ``range`` (the typical raw (low, high), default per kind) say how it enters ``combine``.

    Example:
        >>> scorer_config({"kind": "sanity", "name": "guard", "weight": 2.0}).score_norm()
        ScoreNorm(weight=2.0, low=0.0, high=1.0, penalty=True)
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    kind: str
    name: str | None = None
    weight: float = Field(1.0, ge=0)
    range: tuple[float, float] | None = None
    batch_size: int = Field(8, ge=1)

    default_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    penalty: ClassVar[bool] = False

    @property
    def label(self) -> str:
        return self.name or self.kind

    def score_norm(self) -> ScoreNorm:
        low, high = self.range or self.default_range
        return ScoreNorm(weight=self.weight, low=low, high=high, penalty=self.penalty)

    def check_files(self) -> None:
        """Raise ValueError naming the field and path of a missing or malformed file."""

    def files(self) -> dict[str, Path]:
        """Every file or folder this config points at, by field name (for error messages)."""
        paths = {name: value for name in type(self).model_fields
                 if isinstance(value := getattr(self, name), Path)}
        model = getattr(self, "model", None)
        if isinstance(model, str) and model.endswith(".json"):
            paths["model"] = Path(model)
        return paths

    @model_validator(mode="after")
    def _validate(self) -> ScorerConfig:
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"scorer {self.label!r}: range must be (low, high) with low < high")
        try:
            self.check_files()
        except (ValueError, OSError) as error:
            raise ValueError(f"scorer {self.label!r} ({self.kind}): {error}") from None
        return self


@dataclass(frozen=True)
class ScorerEntry:
    """A registered kind of scorer: its config class and a factory ``(config, device, dtype)``."""

    config: type[ScorerConfig]
    factory: Callable[[Any, torch.device, torch.dtype], Scorer]


SCORERS: dict[str, ScorerEntry] = {}


def register_scorer(kind: str, config: type[ScorerConfig],
                    factory: Callable[[Any, torch.device, torch.dtype], Scorer]) -> None:
    """Make ``kind`` buildable by ``build_scorer``."""
    SCORERS[kind] = ScorerEntry(config, factory)


def scorer_config(data: ScorerConfig | Mapping[str, Any]) -> ScorerConfig:
    """Validate a mapping (``kind`` picks the config class) into a typed scorer config."""
    if isinstance(data, ScorerConfig):
        return data
    kind = data.get("kind")
    if kind not in SCORERS:
        raise ScorerError(f"unknown scorer kind {kind!r}; known: {', '.join(sorted(SCORERS))}")
    try:
        return SCORERS[kind].config.model_validate(dict(data))
    except ValidationError as error:
        raise ScorerError(f"scorer {data.get('name') or kind!r}: {error}") from None


def build_scorer(config: ScorerConfig | Mapping[str, Any], device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> Scorer:
    """Load the scorer ``config`` describes onto ``device`` (default: CUDA if present) in ``dtype``.

    Files were checked when the config was made; a file that still fails to load (wrong model
    for the config, truncated weights) raises ``ScorerError`` naming the scorer and the cause.
    """
    config = scorer_config(config)
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    try:
        return SCORERS[config.kind].factory(config, device, dtype)
    except ScorerError:
        raise
    except Exception as error:
        files = ", ".join(f"{name}={path}" for name, path in config.files().items())
        detail = str(error) if len(str(error)) <= _MAX_DETAIL else str(error)[:_MAX_DETAIL] + " ..."
        raise ScorerError(f"scorer {config.label!r} ({config.kind}) failed to load from "
                          f"{files or 'no files'}: {type(error).__name__}: {detail}") from error


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on accelerators, float32 on CPU (CPU half matmuls are slow and coarse)."""
    return torch.float32 if device.type == "cpu" else torch.float16


def batches(n: int, size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in chunks of ``size``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def check_images(images: Tensor, prompts: Sequence[str] | None = None) -> None:
    """Raise ValueError unless ``images`` is ``[N, 3, H, W]`` with one prompt per image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")


# --------------------------------------------------------------------------- file checks


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
