"""The study config: one YAML file, validated as a whole before any tensor is touched.

Errors name the field path (``merge.bounds.IN04``) and what would fix it. See
``configs/sd15_example.yaml`` for a commented example.

Example:
    >>> cfg = load_config("configs/sd15_example.yaml")      # doctest: +SKIP
    >>> cfg.merge.vocabulary, cfg.sampler.name               # doctest: +SKIP
    ('mbw', 'cmaes')
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from evaluators import ProbeSet, ScorerConfig, ScorerError, scorer_config
from evaluators.scorer import file_fields, known_scorer_kinds, scorer_entry
from merge_backend.architectures import ARCHITECTURES, block_names
from merge_backend.devices import DEVICE, auto_device
from merge_backend.methods import METHODS
from merge_backend.yaml_files import read_yaml

from .config_errors import nearest, problems
from .config_search import FidelityConfig, ScreeningConfig

PERSON = ("preference", "mixed")  # objectives where a person chooses in the dashboard
# The sampler a study uses unless it names one, by objective: CMA-ES for one scored objective
# (chosen by benchmarks/search_quality.py: 26 continuous ratios, 100-300 trials; see
# benchmarks/RESULTS.md), TPE for several (CMA-ES serves one), the preferential GP for a person.
DEFAULT_SAMPLERS = {"weighted": "cmaes", "multi": "tpe", "preference": "preferential_gp",
                    "mixed": "preferential_gp"}
# ... and for one scored objective whose only objective scorer gives residuals (the paired
# reference scorer): CMA-ES, then least-squares steps on them (search/least_squares.py; chosen
# by the same benchmark)
RESIDUAL_DEFAULT = "lsq"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # one plain path component: output/NAME


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
            raise ValueError(f"{path} does not exist; give the checkpoint's path (relative to "
                             "the config file's folder, or absolute)")
        return path


class Searched(_Strict):
    """A value searched in [low, high]."""

    low: FiniteFloat
    high: FiniteFloat

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
    partial: bool = False  # skip (and name) keys of formats mergesearch cannot apply

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not path.exists():
            raise ValueError(f"{path} does not exist; give the LoRA file's path")
        return path


class MergeSpace(_Strict):
    method: str = "weighted_sum"  # any merge method with ratios (merge_backend.methods)
    vocabulary: str = "mbw"  # any vocabulary of the architecture's file (checked with its blocks)
    bounds: tuple[FiniteFloat, FiniteFloat] = (0.0, 1.0)
    block_bounds: dict[str, tuple[FiniteFloat, FiniteFloat]] = Field(default_factory=dict)
    fixed: dict[str, FiniteFloat] = Field(default_factory=dict)
    tied: list[list[str]] = Field(default_factory=list)
    multiplier: FiniteFloat | Searched = 1.0
    text_encoder: TextEncoderPolicy = TextEncoderPolicy()
    arithmetic: Literal["comfy", "fast"] = "fast"
    # The precision the UNet / text encoders are held in while merging, as ComfyUI holds them
    # (merge_backend.dtypes); None: the study's dtype. ComfyUI's default text encoder: fp16.
    unet_dtype: Literal["fp16", "bf16", "fp32"] | None = None
    text_encoder_dtype: Literal["fp16", "bf16", "fp32"] | None = None
    allow_extrapolation: bool = False
    loras: list[LoraSearch] = Field(default_factory=list)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        try:
            method = METHODS[value]
        except KeyError:
            known = list(METHODS)
            near = nearest(value, known)
            raise ValueError(f"{value!r} is not one of {', '.join(known)}"
                             + (f" (did you mean {near}?)" if near else "")
                             + "; a plug-in method comes from an installed package's "
                             "`mergesearch.methods` entry point") from None
        if not method.uses_ratio:
            raise ValueError(f"{value} ({method.formula}) has no ratios to search; a study "
                             "needs a method with per-block ratios")
        unknown = [r for r in method.roles if r not in Models.model_fields]
        if unknown:
            raise ValueError(f"{value} reads model(s) {', '.join(unknown)} that a study config "
                             f"cannot name (models: {', '.join(Models.model_fields)})")
        return value

    @field_validator("vocabulary")
    @classmethod
    def _known_vocabulary(cls, value: str) -> str:
        known = list(dict.fromkeys(v for a in ARCHITECTURES.values() for v in a.vocabulary_names))
        if value not in known:
            near = nearest(value, known)
            raise ValueError(f"{value!r} is not one of {', '.join(known)}"
                             + (f" (did you mean {near}?)" if near else ""))
        return value

    @model_validator(mode="after")
    def _bounds(self) -> MergeSpace:
        problems = []
        for name, (low, high) in {"bounds": self.bounds, **{
                f"block_bounds.{k}": v for k, v in self.block_bounds.items()}}.items():
            if not low < high:
                problems.append(f"{name}: low ({low}) must be below high ({high})")
            elif not self.allow_extrapolation and not (0 <= low and high <= 1):
                problems.append(f"{name}: ({low}, {high}) leaves [0, 1]; set "
                                "merge.allow_extrapolation: true to extrapolate")
        if not self.allow_extrapolation:
            problems += [f"fixed.{block}: {value} is outside [0, 1]; set "
                         "merge.allow_extrapolation: true to extrapolate"
                         for block, value in self.fixed.items() if not 0 <= value <= 1]
        if problems:
            raise ValueError("\n".join(problems))
        return self


class SamplerConfig(_Strict):
    """``seed`` makes a single uninterrupted worker reproducible; each trial's random draws are
    seeded with (seed, trial number), so resumes and other workers draw new points."""

    # a built-in, a `mergesearch.samplers` entry point, or package.module:Class; a study left
    # without one gets its objective's default (StudyConfig, DEFAULT_SAMPLERS)
    name: str = DEFAULT_SAMPLERS["weighted"]
    seed: int = Field(0, ge=0, le=2**32 - 1)  # what numpy's generators (QMC's) accept
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from .samplers import sampler_entry  # imports optuna: only when a study is read

        sampler_entry(name)  # SamplerError (a ValueError) says what is wrong
        return name

    @field_validator("options")
    @classmethod
    def _options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from .samplers import option_problems  # imports optuna: only when a study is read

        found = option_problems(info.data.get("name", DEFAULT_SAMPLERS["weighted"]), options)
        if found:
            raise ValueError("\n".join(found))
        return options


class WarmStart(_Strict):
    """Trials enqueued before the sampler takes over (each only once per study)."""

    model1: bool = True
    model2: bool = True
    uniform: list[FiniteFloat] = Field(default_factory=lambda: [0.5])  # inside merge.bounds
    presets: dict[str, dict[str, FiniteFloat]] = Field(default_factory=dict)
    # smooth ratio curves over the blocks' depth (search.curves): how many
    curves: int = Field(0, ge=0, le=256)


class PreferenceConfig(_Strict):
    """How a person steers a ``preference`` or ``mixed`` study in optuna-dashboard: the page
    shows ``candidates`` probe grids and asks which is the worst; each choice is stored in the
    study and the preferential GP proposes the next candidate. In ``mixed`` mode the scorers
    judge ``pool`` proposals for every candidate shown and only the best reaches the page."""

    candidates: int = Field(4, ge=2)
    pool: int = Field(4, ge=2)


class StudyConfig(_Strict):
    name: str
    models: Models
    merge: MergeSpace = MergeSpace()
    probes: ProbeSet
    scorers: list[SerializeAsAny[ScorerConfig]] = Field(default_factory=list)
    objective: Literal["weighted", "multi", "preference", "mixed"] = "weighted"
    preference: PreferenceConfig = PreferenceConfig()
    sampler: SamplerConfig = SamplerConfig()
    warm_start: WarmStart = WarmStart()
    screening: ScreeningConfig | None = None
    fidelity: FidelityConfig | None = None
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
    # propose trial N+1 (and store trial N-1) while trial N draws (search.lane); a person's
    # studies never do: their proposals wait for the person's choices
    propose_ahead: bool = True

    @model_validator(mode="before")
    @classmethod
    def _default_sampler(cls, data: Any) -> Any:
        """Unless a sampler is named, the objective's default (``DEFAULT_SAMPLERS``; ``lsq``
        where the only objective scorer gives residuals, ``RESIDUAL_DEFAULT``)."""
        if isinstance(data, dict):
            objective = data.get("objective", "weighted")
            name = DEFAULT_SAMPLERS.get(objective)
            if objective == "weighted" and _gives_residuals(data.get("scorers")):
                name = RESIDUAL_DEFAULT
            sampler = data.get("sampler")
            if name is not None and sampler is None:
                data = {**data, "sampler": {"name": name}}
            elif name is not None and isinstance(sampler, dict) and "name" not in sampler:
                data = {**data, "sampler": {**sampler, "name": name}}
        return data

    @field_validator("scorers", mode="before")
    @classmethod
    def _scorers(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError("a list of scorer mappings, each with a `kind`")
        return [scorer_config(v) for v in value]

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a plain folder name: the run folder is "
                             "output/NAME, so use letters, digits, '_', '-' and '.', starting "
                             "with a letter or digit (no '/', no '..')")
        return value

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("sqlite://") and _sqlite_file(value) is None:
            raise ValueError(f"{value!r} is an in-memory SQLite database, lost when the run ends "
                             "(and each worker would have its own); give a file, "
                             "sqlite:///path/study.db, or leave storage out for the run folder's")
        return value

    @field_validator("output", mode="before")
    @classmethod
    def _output(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty; name the folder run folders go into (default: runs)")
        return value

    @field_validator("grace_seconds")
    @classmethod
    def _grace(cls, grace: int, info: ValidationInfo) -> int:
        heartbeat = info.data.get("heartbeat_seconds")
        if heartbeat is not None and grace < 2 * heartbeat:
            raise ValueError(f"{grace} is less than twice heartbeat_seconds ({heartbeat}): "
                             "other workers would mark live trials FAIL and lose their scores; "
                             f"use grace_seconds >= {2 * heartbeat}")
        return grace

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE.fullmatch(value):
            raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N (N a GPU "
                             "number, e.g. cuda:0) or mps")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> StudyConfig:
        problems = []
        if self.merge.method in METHODS:
            method = METHODS[self.merge.method]
            problems += [f"models.{role}: merge.method {method.name} needs a {role} model"
                         for role in method.roles if getattr(self.models, role, None) is None]
            if isinstance(self.merge.multiplier, Searched) and not method.uses_multiplier:
                problems.append(f"merge.multiplier: merge.method {method.name} takes no "
                                "multiplier; searching one would change nothing")
        sampler = _sampler_entry(self.sampler.name)
        if self.objective == "multi" and not sampler.multi_objective:
            problems.append(f"sampler.name: {self.sampler.name} is single-objective; use tpe, "
                            "nsga2, qmc or random with objective: multi")
        if self.objective in PERSON and sampler.learns_from == "scores":
            problems.append(f"sampler.name: {self.sampler.name} learns from scores, and a "
                            f"{self.objective} study has a person's choices instead; use "
                            "preferential_gp (the default) or random")
        if self.objective not in PERSON and sampler.learns_from == "choices":
            problems.append(f"sampler.name: {self.sampler.name} learns from a person's choices; "
                            "use it with objective: preference or mixed")
        if sampler.residuals and self.objective not in PERSON and \
                _residual_label(self.scorers) is None:
            objectives = [s.label for s in _objectives(self.scorers)] or ["none"]
            problems.append(f"sampler.name: {self.sampler.name} fits the residuals of the study's "
                            "only objective scorer, which must give them (kind: reference, mode: "
                            f"paired); this study's objective scorers: {', '.join(objectives)}")
        if self.objective != "preference" and not self.scorers:
            problems.append(f"scorers: objective {self.objective} needs at least one scorer "
                            "(only objective: preference runs without: a person judges)")
        if len({s.label for s in self.scorers}) != len(self.scorers):
            problems.append("scorers: two scorers share a name; give each a distinct `name`")
        low, high = self.merge.bounds
        problems += [f"warm_start.uniform[{i}]: {u} is outside merge.bounds ({low}, {high}); "
                     "the uniform merge would not be the one asked for"
                     for i, u in enumerate(self.warm_start.uniform) if not low <= u <= high]
        problems += self._preset_problems()
        if self.objective in ("weighted", "mixed") and self.scorers and \
                all(s.weight == 0 for s in self.scorers):
            problems.append("scorers: every weight is 0, so every candidate would score the "
                            "same; give at least one scorer a weight above 0")
        problems += self._strategy_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def residual_scorer(self) -> str | None:
        """The scorer whose residuals each trial stores for the sampler (``lsq``), or None when
        the sampler reads none."""
        if not _sampler_entry(self.sampler.name).residuals:
            return None
        return _residual_label(self.scorers)

    def _preset_problems(self) -> list[str]:
        """A preset is queued as given, or refused: a fixed block, a value outside its bounds
        or tied blocks that differ would be ignored, clipped or averaged."""
        problems = []
        for name, ratios in self.warm_start.presets.items():
            where = f"warm_start.presets.{name}"
            for block, value in ratios.items():
                low, high = self.merge.block_bounds.get(block, self.merge.bounds)
                if block in self.merge.fixed:
                    problems.append(f"{where}.{block}: the block is fixed (merge.fixed) at "
                                    f"{self.merge.fixed[block]}; the preset's {value} would be "
                                    "ignored")
                elif not low <= value <= high:
                    problems.append(f"{where}.{block}: {value} is outside its bounds ({low}, "
                                    f"{high}); the preset would be clipped to them")
            for group in self.merge.tied:
                values = {ratios[b] for b in group if b in ratios}
                if len(values) > 1:
                    problems.append(f"{where}: {', '.join(b for b in group if b in ratios)} are "
                                    "tied (merge.tied) and would take their mean; give them one "
                                    "value")
        return problems

    def _strategy_problems(self) -> list[str]:
        problems = []
        for name, option in (("screening", self.screening), ("fidelity", self.fidelity)):
            if option is not None and self.objective != "weighted":
                problems.append(f"{name}: works on one scored objective (objective: weighted), "
                                f"not objective: {self.objective}; remove `{name}`")
        if self.fidelity is not None and self.fidelity.steps >= self.probes.steps:
            problems.append(f"fidelity.steps: {self.fidelity.steps} is not below probes.steps "
                            f"({self.probes.steps}): cheap probes would cost as much as the "
                            "full ones; use fewer steps")
        return problems

    @property
    def run_folder(self) -> Path:
        return self.output / self.name

    def resolved_device(self) -> str:
        """``device`` with ``auto`` resolved (CUDA where there is one)."""
        return auto_device() if self.device == "auto" else self.device

    def resolved_dtype(self) -> str:
        """``dtype`` with ``auto`` resolved: fp16 on a GPU, fp32 on the CPU."""
        if self.dtype != "auto":
            return self.dtype
        return "fp32" if self.resolved_device() == "cpu" else "fp16"


def _gives_residuals(scorers: Any) -> bool:
    """Whether a config's ``scorers`` (as read: mappings) have one objective scorer and it
    gives residuals; False for anything the scorers' own checks will refuse."""
    try:  # unvalidated (``model_construct``): the kind's fields alone, no files read
        configs = [item if isinstance(item, ScorerConfig)
                   else scorer_entry(item["kind"]).config.model_construct(**item)
                   for item in (scorers if isinstance(scorers, list) else [])]
        return _residual_label(configs) is not None
    except (TypeError, KeyError, ValueError):
        return False


def _objectives(scorers) -> list[ScorerConfig]:
    return [s for s in scorers if not s.penalty and s.weight > 0]


def _residual_label(scorers) -> str | None:
    """The label of the study's only objective scorer where it gives residuals, else None."""
    objectives = _objectives(scorers)
    if len(objectives) == 1 and objectives[0].has_residuals():
        return objectives[0].label
    return None


def _sqlite_file(url: str) -> Path | None:
    from .run_folder import sqlite_file  # imports optuna: only when a study is read

    return sqlite_file(url)


def _sampler_entry(name: str):
    from .samplers import sampler_entry  # imports optuna: only when a study is read

    return sampler_entry(name)


def check_blocks(cfg: StudyConfig, arch_name: str) -> None:
    """Block names in bounds / fixed / tied / presets must exist in the vocabulary."""
    arch = ARCHITECTURES[arch_name]
    if cfg.merge.vocabulary not in arch.vocabulary_names:
        raise ConfigError(f"merge.vocabulary: {arch.title} has no {cfg.merge.vocabulary!r} "
                          f"vocabulary; choose one of {', '.join(arch.vocabulary_names)}")
    names = block_names(arch, cfg.merge.vocabulary)
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
        if len(set(group)) < 2:
            problems.append(f"merge.tied[{i}] (a tie needs two or more blocks)")
        problems += [f"merge.tied[{i}].{n} (twice in one tie)"
                     for n in dict.fromkeys(n for n in group if group.count(n) > 1)]
        overlap = seen.intersection(group) | set(group).intersection(cfg.merge.fixed)
        problems += [f"merge.tied[{i}].{n} (already tied or fixed)" for n in overlap]
        seen.update(group)
    if problems:
        raise ConfigError(f"unknown or misused block name(s) for the {cfg.merge.vocabulary} "
                          f"vocabulary of {arch_name}: {', '.join(problems)}; valid names: "
                          f"{', '.join(names)}")


def read_yaml_mapping(path: Path, where: str, error: type[ValueError]) -> dict[str, Any]:
    """A YAML (or JSON) file that must hold a mapping; ``error(where: …)`` otherwise."""
    data = read_yaml(path, error, name=where)
    if not isinstance(data, dict):
        raise error(f"{where}: expected a YAML mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read and validate a study config; relative paths resolve next to the YAML file. A run
    folder's own copy (``RUN/config.yaml``) names that folder, wherever it was moved."""
    path = Path(path)
    data = read_yaml_mapping(path, f"{path}", ConfigError)
    data.update(overrides or {})
    cfg = parse_config(data, base_dir=path.parent, source=str(path))
    _check_runnable_from_a_file(cfg, path)
    return _in_its_run_folder(cfg, path)


def _check_runnable_from_a_file(cfg: StudyConfig, path: Path) -> None:
    """What only code can supply: the reference scorer's images (``set_references``, which
    the benchmarks call). Read from a file, a reference scorer without ``references`` would
    fail every trial."""
    for i, scorer in enumerate(cfg.scorers):
        if scorer.kind == "reference" and scorer.references is None:
            raise ConfigError(f"{path}: scorers[{i}].references: the reference scorer compares "
                              "each candidate's probes with reference images; give a folder of "
                              "them (in probe order for mode: paired)")


def _in_its_run_folder(cfg: StudyConfig, path: Path) -> StudyConfig:
    """A config lying in a run folder (run.json beside it) is that folder's copy: its `output`
    still names where the study first ran, so after a move it would start a new, empty study
    there. It runs the folder it lies in; one renamed since is refused, as its study's name no
    longer names it (output/NAME)."""
    from .run_folder import RUN_FILE

    folder = Path(os.path.abspath(path.parent))
    if not (folder / RUN_FILE).is_file() or folder == Path(os.path.abspath(cfg.run_folder)):
        return cfg
    if folder.name != cfg.name:
        raise ConfigError(f"{path}: the config of study {cfg.name!r}, in a run folder named "
                          f"{folder.name!r}; a run folder is OUTPUT/NAME: rename it back to "
                          f"{cfg.name!r} to resume it, or copy the config elsewhere to start "
                          "a new run")
    return cfg.model_copy(update={"output": folder.parent})


def parse_config(data: dict[str, Any], base_dir: Path = Path("."), source: str = "config"
                 ) -> StudyConfig:
    """Validate a config mapping; every problem is reported at once, each with its field path.

    Relative paths resolve against ``base_dir`` and are stored absolute, so a run folder names
    its sources the same from any working directory."""
    base_dir = Path(os.path.abspath(base_dir))
    data = _resolve_paths(dict(data), base_dir)
    found: list[tuple[str, str]] = []
    if isinstance(data.get("scorers"), list):
        scorers, found = _scorer_configs(data["scorers"])
        # the rest is validated with the scorers that are valid (a stand-in when none is), so
        # their problems and everyone else's are reported together
        data["scorers"] = scorers if scorers or not found else [scorer_config({"kind": "sanity"})]
    try:
        cfg = StudyConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        found += problems(exc, StudyConfig)
        cfg = None
    if found:
        order = list(StudyConfig.model_fields)
        found.sort(key=lambda p: order.index(p[0].split(".")[0].split("[")[0])
                   if p[0].split(".")[0].split("[")[0] in order else len(order))
        lines = "\n".join(f"  {path}: {message}" for path, message in found)
        count = f"{len(found)} problems" if len(found) > 1 else "1 problem"
        raise ConfigError(f"{source}: invalid study config ({count}):\n{lines}")
    assert cfg is not None
    return cfg


def _scorer_configs(items: list[Any]) -> tuple[list[ScorerConfig], list[tuple[str, str]]]:
    """Each scorer validated by its own kind's config class, problems named ``scorers[i].field``."""
    configs: list[ScorerConfig] = []
    found: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        where = f"scorers[{i}]"
        if not isinstance(item, dict):
            found.append((where, "expected a mapping with a `kind` (e.g. kind: clip)"))
            continue
        kind = item.get("kind")
        known = known_scorer_kinds()
        if kind not in known and not (isinstance(kind, str) and ":" in kind):
            near = nearest(str(kind), known)
            hint = f" (did you mean {near}?)" if near else ""
            found.append((f"{where}.kind", f"unknown scorer kind {kind!r}{hint}; known: "
                                           f"{', '.join(known)}, or package.module:Class"))
            continue
        try:
            config_class = scorer_entry(kind).config
        except ScorerError as exc:  # an installed plug-in or import path that fails to load
            found.append((f"{where}.kind", str(exc)))
            continue
        try:
            configs.append(config_class.model_validate(item))
        except ValidationError as exc:
            for path, message in problems(exc, config_class, ("scorers", i)):
                found.append(_file_field(path, message, item))
    return configs, found


def _file_field(path: str, message: str, item: dict[str, Any]) -> tuple[str, str]:
    """A scorer's file check reports its scorer, not its field: name the field whose path the
    message quotes (``scorers[0]`` -> ``scorers[0].weights``)."""
    if "." in path.rsplit("]", 1)[-1]:
        return path, message
    message = re.sub(r"^scorer '[^']*'(?: \([^)]*\))?: ", "", message)
    field = message.split(" ", 1)[0]
    if field in item and message.startswith(f"{field} "):
        return f"{path}.{field}", message
    quoted = [(len(str(v)), k) for k, v in item.items()
              if isinstance(v, str) and len(v) > 1 and str(v) in message]
    return (f"{path}.{max(quoted)[1]}", message) if quoted else (path, message)


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    def fix(value: Any) -> Any:
        return os.path.normpath(base / os.path.expanduser(value)) \
            if isinstance(value, str) and value else value

    data = map_paths(data, fix)
    for key in ("output", "config_folder"):
        if key in data:
            data[key] = fix(data[key])
    storage = data.get("storage")
    db = _sqlite_file(storage) if isinstance(storage, str) else None
    if db is not None and not db.is_absolute():  # next to the config, stored absolute
        query = storage.partition("?")[2]
        data["storage"] = f"sqlite:///{fix(str(db))}" + (f"?{query}" if query else "")
    data.setdefault("output", os.path.abspath("runs"))  # the default: runs/ where `run` starts
    if isinstance(data.get("probes"), dict) and isinstance(data["probes"].get("prompts"), str):
        data["probes"] = {**data["probes"], "prompts": fix(data["probes"]["prompts"])}
    return data


def map_paths(data: dict[str, Any], fn: Callable[[Any], Any]) -> dict[str, Any]:
    """``data`` (a config mapping) with ``fn`` applied to every source and scorer file path:
    ``models.*``, ``merge.loras[].path`` and the scorers' files."""
    data = dict(data)
    if isinstance(data.get("models"), dict):
        data["models"] = {k: fn(v) for k, v in data["models"].items()}
    merge = data.get("merge")
    if isinstance(merge, dict) and isinstance(merge.get("loras"), list):
        data["merge"] = {**merge, "loras": [{**x, "path": fn(x.get("path"))} if isinstance(x, dict)
                                            else x for x in merge["loras"]]}
    if isinstance(data.get("scorers"), list):
        data["scorers"] = [_map_scorer_paths(s, fn) for s in data["scorers"]]
    return data


def _map_scorer_paths(scorer: Any, fn: Callable[[Any], Any]) -> Any:
    """A scorer mapping with ``fn`` applied to the fields its config class marks as files
    (``ConfigPath``); unchanged when its kind is unknown (validation says so)."""
    if not isinstance(scorer, dict):
        return scorer
    try:
        fields = file_fields(scorer_entry(scorer.get("kind")).config)
    except ScorerError:
        return scorer
    return {k: fn(v) if k in fields and isinstance(v, str) and fields[k].applies(v) else v
            for k, v in scorer.items()}
