"""The scorer interface, scorer configs, and the registry ``build_scorer`` reads.

A scorer is anything with a ``name`` and ``score(images, prompts) -> Tensor[N]`` (higher is
better). Each kind of scorer has a pydantic config whose file fields (typed ``ConfigPath``)
are checked when the config is made, so a missing or wrong file fails at start-up with the
scorer and the path named, before any model is loaded. Kinds are the built-ins, another
package's ``mergesearch.scorers`` entry points, or ``package.module:Class`` written as the
``kind`` (``scorer_entry``); ``evaluators/scorer_contract.py`` is the test every kind passes.

Example:
    >>> scorer = build_scorer({"kind": "sanity"}, device="cpu")
    >>> scorer.score(torch.zeros(1, 3, 8, 8), ["a cat"])
    tensor([-3.])
"""

from __future__ import annotations

import pkgutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, model_validator
from torch import Tensor

from evaluators.scorer_files import (
    ConfigFile,
    ConfigFolder,
    ConfigPath,
    file_fields,
    require_dir,
    require_file,
)

__all__ = [
    "SCORERS", "ENTRY_POINT_GROUP", "ConfigFile", "ConfigFolder", "ConfigPath", "ExplainsScores",
    "HasResiduals", "ScoreNorm",
    "Scorer", "ScorerConfig", "ScorerEntry", "ScorerError", "batches", "build_scorer",
    "check_images", "default_dtype", "file_fields", "known_scorer_kinds", "register_scorer",
    "require_dir", "require_file", "resolve_device", "scorer_config", "scorer_entry",
]
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
class HasResiduals(Protocol):
    """A scorer whose value of image *i* is ``1 - |d_i|^2 / 2`` for a residual vector ``d_i``
    (the paired ``reference`` scorer: unit embeddings, ``e.r = 1 - |e - r|^2 / 2``): it scores
    and gives the residuals ``[N, K]`` (or None where this config has none) in one pass. A
    least-squares sampler (``lsq``) fits its steps to them."""

    def score_with_residuals(self, images: Tensor, prompts: Sequence[str]
                             ) -> tuple[Tensor, Tensor | None]: ...


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
    weight: FiniteFloat = Field(1.0, ge=0)
    range: tuple[FiniteFloat, FiniteFloat] | None = None
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

    def has_residuals(self) -> bool:
        """Whether the scorer this config builds gives residuals (``HasResiduals``)."""
        return False

    def files(self) -> dict[str, Path]:
        """Every file or folder this config points at, by field name (its ``ConfigPath``
        fields; for error messages)."""
        return {name: Path(value) for name, marker in file_fields(type(self)).items()
                if marker.applies(value := getattr(self, name))}

    @model_validator(mode="after")
    def _validate(self) -> ScorerConfig:
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"scorer {self.label!r}: range must be (low, high) with low < high")
        try:
            markers = file_fields(type(self))
            for field, path in self.files().items():
                if problem := markers[field].problem(field, path):
                    raise ValueError(problem)
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
ENTRY_POINT_GROUP = "mergesearch.scorers"


def register_scorer(kind: str, config: type[ScorerConfig],
                    factory: Callable[[Any, torch.device, torch.dtype], Scorer]) -> None:
    """Make ``kind`` buildable by ``build_scorer``."""
    SCORERS[kind] = ScorerEntry(config, factory)


def scorer_entry(kind: str) -> ScorerEntry:
    """The scorer ``kind`` names: a registered one, another package's ``mergesearch.scorers``
    entry point, or ``package.module:Class``. A plug-in is a ``ScorerEntry`` or a scorer class
    with ``config_class`` (its ScorerConfig) and ``from_config(config, device, dtype)``.
    ScorerError names the kind and what is wrong."""
    if not isinstance(kind, str):
        raise ScorerError(f"scorer kind {kind!r} is not a name")
    if kind in SCORERS:
        return SCORERS[kind]
    found = _plugin(kind, tuple(sys.path))
    if found is None:
        raise ScorerError(f"unknown scorer kind {kind!r}; known: {', '.join(known_scorer_kinds())}"
                          " (or package.module:Class for a scorer of your own)")
    return found


@lru_cache(maxsize=64)
def _plugin(kind: str, path: tuple[str, ...]) -> ScorerEntry | None:
    # cached per sys.path, as the entry points are
    module, sep, attr = kind.partition(":")
    try:
        if sep and module and attr:
            obj = pkgutil.resolve_name(kind)
        else:
            point = _entry_points(path).get(kind)
            if point is None:
                return None
            obj = point.load()
    except Exception as exc:  # noqa: BLE001 - any failure to import a plug-in is reported alike
        raise ScorerError(f"scorer kind {kind!r} cannot be imported: {type(exc).__name__}: "
                          f"{exc}") from None
    if isinstance(obj, ScorerEntry):
        return obj
    config, factory = getattr(obj, "config_class", None), getattr(obj, "from_config", None)
    if not (isinstance(config, type) and issubclass(config, ScorerConfig) and callable(factory)):
        raise ScorerError(f"scorer kind {kind!r} names {obj!r}, which is neither a ScorerEntry "
                          "nor a scorer class with config_class (a ScorerConfig) and "
                          "from_config(config, device, dtype)")
    return ScorerEntry(config, factory)


@lru_cache(maxsize=8)
def _entry_points(path: tuple[str, ...]) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_scorer_kinds() -> list[str]:
    """Every scorer kind by name: registered ones and installed entry points."""
    return sorted(set(SCORERS) | set(_entry_points(tuple(sys.path))))


def scorer_config(data: ScorerConfig | Mapping[str, Any]) -> ScorerConfig:
    """Validate a mapping (``kind`` picks the config class) into a typed scorer config."""
    if isinstance(data, ScorerConfig):
        return data
    entry = scorer_entry(data.get("kind"))
    try:
        return entry.config.model_validate(dict(data))
    except ValidationError as error:
        raise ScorerError(f"scorer {data.get('name') or data.get('kind')!r}: {error}") from None


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
        return scorer_entry(config.kind).factory(config, device, dtype)
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
