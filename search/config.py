"""The study config: one YAML file, validated as a whole before any tensor is touched.

Errors name the field path (``merge.bounds.IN04``) and what would fix it. See
``configs/sd15_example.yaml`` for a commented example.

Example:
    >>> cfg = load_config("configs/sd15_example.yaml")      # doctest: +SKIP
    >>> cfg.merge.vocabulary, cfg.sampler.name               # doctest: +SKIP
    ('mbw', 'tpe')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from evaluators import ProbeSet, ScorerConfig, scorer_config
from merge_backend.architectures import ARCHITECTURES, block_names

SAMPLERS = ("tpe", "cmaes", "gp", "qmc", "random", "nsga2")
WARM_STARTS = ("model1", "model2", "uniform")


class ConfigError(ValueError):
    """An invalid study config; the message lists every bad field with its path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Models(_Strict):
    model1: Path
    model2: Path
    base: Path | None = None

    @field_validator("model1", "model2", "base")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.exists():
            raise ValueError(f"{path} does not exist")
        return path


class Searched(_Strict):
    """A value searched in [low, high]."""

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Searched:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class TextEncoderPolicy(_Strict):
    """model1's text encoders (ComfyUI's default), or a CLIPMergeSimple ratio (fixed or searched)."""

    mode: Literal["model1", "merge"] = "model1"
    ratio: float | Searched = 1.0


class LoraSearch(_Strict):
    """A LoRA added on top of every candidate; its strength fixed or searched, globally or for
    chosen blocks (each block's strength multiplies the global one)."""

    path: Path
    strength: float | Searched = 1.0
    blocks: list[str] = Field(default_factory=list)
    block_range: tuple[float, float] = (0.0, 1.0)
    te_strength: float | None = None

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        return path


class MergeSpace(_Strict):
    method: Literal["weighted_sum", "add_difference"] = "weighted_sum"
    vocabulary: Literal["single", "blocks", "comfy", "mbw"] = "mbw"
    bounds: tuple[float, float] = (0.0, 1.0)
    block_bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    fixed: dict[str, float] = Field(default_factory=dict)
    tied: list[list[str]] = Field(default_factory=list)
    multiplier: float | Searched = 1.0
    text_encoder: TextEncoderPolicy = TextEncoderPolicy()
    arithmetic: Literal["comfy", "fast"] = "fast"
    allow_extrapolation: bool = False
    loras: list[LoraSearch] = Field(default_factory=list)

    @model_validator(mode="after")
    def _bounds(self) -> MergeSpace:
        for name, (low, high) in {"bounds": self.bounds, **{
                f"block_bounds.{k}": v for k, v in self.block_bounds.items()}}.items():
            if not low < high:
                raise ValueError(f"{name}: low ({low}) must be below high ({high})")
            if not self.allow_extrapolation and not (0 <= low and high <= 1):
                raise ValueError(f"{name}: ({low}, {high}) leaves [0, 1]; set "
                                 "merge.allow_extrapolation: true to extrapolate")
        return self


class SamplerConfig(_Strict):
    name: Literal["tpe", "cmaes", "gp", "qmc", "random", "nsga2"] = "tpe"
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


class WarmStart(_Strict):
    """Trials enqueued before the sampler takes over (each only once per study)."""

    model1: bool = True
    model2: bool = True
    uniform: list[float] = Field(default_factory=lambda: [0.5])
    presets: dict[str, dict[str, float]] = Field(default_factory=dict)


class StudyConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    models: Models
    merge: MergeSpace = MergeSpace()
    probes: ProbeSet
    scorers: list[SerializeAsAny[ScorerConfig]] = Field(min_length=1)
    objective: Literal["weighted", "multi"] = "weighted"
    sampler: SamplerConfig = SamplerConfig()
    warm_start: WarmStart = WarmStart()
    trials: int = Field(50, ge=1)
    timeout: float | None = Field(None, gt=0)
    storage: str | None = None
    heartbeat_seconds: int = Field(30, ge=1)  # a running trial's sign of life in RDB storage
    grace_seconds: int = Field(90, ge=2)  # silence after which another worker marks it FAIL
    output: Path = Path("runs")
    device: str = "auto"
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    memory: Literal["auto", "device", "offload"] = "auto"
    config_folder: Path | None = None

    @field_validator("scorers", mode="before")
    @classmethod
    def _scorers(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError("a list of scorer mappings, each with a `kind`")
        return [scorer_config(v) for v in value]

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto" and value.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"{value!r}: use auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> StudyConfig:
        if self.merge.method == "add_difference" and self.models.base is None:
            raise ValueError("merge.method add_difference needs models.base")
        if self.objective == "multi" and self.sampler.name in ("cmaes", "gp"):
            raise ValueError(f"sampler.name {self.sampler.name} is single-objective; use tpe, "
                             "nsga2, qmc or random with objective: multi")
        if len({s.label for s in self.scorers}) != len(self.scorers):
            raise ValueError("scorers: two scorers share a name; give each a distinct `name`")
        return self

    @property
    def run_folder(self) -> Path:
        return self.output / self.name


def check_blocks(cfg: StudyConfig, arch_name: str) -> None:
    """Block names in bounds / fixed / tied / presets must exist in the vocabulary."""
    names = block_names(ARCHITECTURES[arch_name], cfg.merge.vocabulary)
    problems = []
    places = {"merge.block_bounds": cfg.merge.block_bounds, "merge.fixed": cfg.merge.fixed}
    places.update({f"warm_start.presets.{k}": v for k, v in cfg.warm_start.presets.items()})
    places.update({f"merge.loras[{i}].blocks": dict.fromkeys(lora.blocks)
                   for i, lora in enumerate(cfg.merge.loras)})
    for where, mapping in places.items():
        problems += [f"{where}.{n}" for n in mapping if n not in names]
    seen: set[str] = set()
    for i, group in enumerate(cfg.merge.tied):
        problems += [f"merge.tied[{i}].{n}" for n in group if n not in names]
        if len(group) < 2:
            problems.append(f"merge.tied[{i}] (a tie needs two or more blocks)")
        overlap = seen.intersection(group) | set(group).intersection(cfg.merge.fixed)
        problems += [f"merge.tied[{i}].{n} (already tied or fixed)" for n in overlap]
        seen.update(group)
    if problems:
        raise ConfigError(f"unknown or misused block name(s) for the {cfg.merge.vocabulary} "
                          f"vocabulary of {arch_name}: {', '.join(problems)}; valid names: "
                          f"{', '.join(names)}")


def read_yaml_mapping(path: Path, where: str, error: type[ValueError]) -> dict[str, Any]:
    """A YAML (or JSON) file that must hold a mapping; ``error(where: …)`` otherwise."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise error(f"{where}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{where}: expected a YAML mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read and validate a study config; relative paths resolve next to the YAML file."""
    path = Path(path)
    data = read_yaml_mapping(path, f"{path}", ConfigError)
    data.update(overrides or {})
    return parse_config(data, base_dir=path.parent, source=str(path))


def parse_config(data: dict[str, Any], base_dir: Path = Path("."), source: str = "config"
                 ) -> StudyConfig:
    data = _resolve_paths(dict(data), base_dir)
    try:
        return StudyConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {where}: {message}")
        raise ConfigError(f"{source}: invalid study config:\n" + "\n".join(lines)) from None


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    def fix(value: Any) -> Any:
        return str(base / value) if isinstance(value, str) and not Path(value).is_absolute() else value

    if isinstance(data.get("models"), dict):
        data["models"] = {k: fix(v) for k, v in data["models"].items()}
    merge = data.get("merge")
    if isinstance(merge, dict) and isinstance(merge.get("loras"), list):
        data["merge"] = {**merge, "loras": [{**x, "path": fix(x.get("path"))} if isinstance(x, dict)
                                            else x for x in merge["loras"]]}
    for key in ("output", "config_folder"):
        if key in data:
            data[key] = fix(data[key])
    if isinstance(data.get("probes"), dict) and isinstance(data["probes"].get("prompts"), str):
        data["probes"] = {**data["probes"], "prompts": fix(data["probes"]["prompts"])}
    if isinstance(data.get("scorers"), list):
        data["scorers"] = [_resolve_scorer_paths(s, fix) for s in data["scorers"]]
    return data


_SCORER_PATH_FIELDS = ("weights", "head", "model_dir", "processor_dir", "references", "model")


def _resolve_scorer_paths(scorer: Any, fix) -> Any:
    if not isinstance(scorer, dict):
        return scorer
    out = dict(scorer)
    for key in _SCORER_PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and (key != "model" or value.endswith(".json")):
            out[key] = fix(value)
    return out
