"""The search space: which numbers Optuna proposes, and the one place they become a Recipe.

Each searched block (or group of tied blocks) is one float parameter named after it; fixed
blocks take their value; the add-difference multiplier and the text-encoder ratio may be
searched too. ``SearchSpace.recipe(params)`` is the only function in the project that turns
Optuna parameters into a Recipe.

Example:
    >>> space = SearchSpace(cfg, template)                  # doctest: +SKIP
    >>> recipe = space.recipe(space.suggest(trial))          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.distributions import FloatDistribution

from merge_backend import ClipMerge, Recipe, Source
from merge_backend.architectures import ARCHITECTURES, block_names, text_encoder_block
from merge_backend.methods import METHODS
from merge_backend.recipe import LoraSpec

from .config import Searched, StudyConfig
from .curves import curve_starts

MULTIPLIER = "multiplier"
TEXT_ENCODER = "te_ratio"


@dataclass(frozen=True)
class Param:
    """One Optuna parameter and the blocks it sets."""

    name: str
    blocks: tuple[str, ...]
    low: float
    high: float

    @property
    def distribution(self) -> FloatDistribution:
        return FloatDistribution(self.low, self.high)


class SearchSpace:
    """Ratios per block of the configured vocabulary, plus optional multiplier / te ratio."""

    def __init__(self, cfg: StudyConfig, arch_name: str):
        self.cfg = cfg
        self.arch_name = arch_name
        # sha256 by file path (as the config gives it), recorded into every Recipe once the
        # study has checked them (search.study.record_sources)
        self.digests: dict[str, str] = {}
        merge = cfg.merge
        self.names = block_names(ARCHITECTURES[arch_name], merge.vocabulary)
        self.fixed = dict(merge.fixed)
        te_block = text_encoder_block(ARCHITECTURES[arch_name], merge.vocabulary)
        self.te_block = te_block
        self.params: list[Param] = []
        tied = {b: tuple(group) for group in merge.tied for b in group}
        done: set[str] = set()
        for name in self.names:
            if name in self.fixed or name in done or name == te_block:
                continue
            group = tied.get(name, (name,))
            low, high = self._bounds(group)
            self.params.append(Param("+".join(group), group, low, high))
            done.update(group)
        self.extra: list[Param] = []
        if isinstance(merge.multiplier, Searched):
            self.extra.append(Param(MULTIPLIER, (), merge.multiplier.low, merge.multiplier.high))
        te = merge.text_encoder
        if te.mode == "merge" and isinstance(te.ratio, Searched):
            self.extra.append(Param(TEXT_ENCODER, (), te.ratio.low, te.ratio.high))
        for i, lora in enumerate(merge.loras):
            if isinstance(lora.strength, Searched):
                self.extra.append(Param(f"lora{i}", (), lora.strength.low, lora.strength.high))
            for block in lora.blocks:
                self.extra.append(Param(f"lora{i}:{block}", (), *lora.block_range))

    def _bounds(self, group: tuple[str, ...]) -> tuple[float, float]:
        bounds = [self.cfg.merge.block_bounds.get(b, self.cfg.merge.bounds) for b in group]
        return max(b[0] for b in bounds), min(b[1] for b in bounds)

    # ------------------------------------------------------------------ Optuna side
    def all_params(self) -> list[Param]:
        return self.params + self.extra

    def distributions(self) -> dict[str, FloatDistribution]:
        return {p.name: p.distribution for p in self.all_params()}

    def param_blocks(self) -> dict[str, list[str]]:
        """Each parameter's blocks (the study's ``params`` attribute; extras have none)."""
        return {p.name: list(p.blocks) for p in self.all_params()}

    def roles(self) -> dict[str, str]:
        """Each block's role for the ratio chart (searched, tied:GROUP, fixed)."""
        return block_roles(self.param_blocks(), self.names, TEXT_ENCODER, self.te_block)

    def suggest(self, trial: optuna.Trial) -> dict[str, float]:
        """Every parameter of ``trial``, proposed by the study's sampler (the worker gathers
        the writes into one: ``search.storage_writes.deferred_suggests``)."""
        return {p.name: trial.suggest_float(p.name, p.low, p.high) for p in self.all_params()}

    # ------------------------------------------------------------------ Recipe side
    def template(self) -> Recipe:
        """The Recipe every candidate shares (ratios at 1.0, model1 unchanged)."""
        return self.recipe({p.name: 1.0 if p.blocks else self._extra_default(p)
                            for p in self.all_params()}, clamp=True)

    def _extra_default(self, p: Param) -> float:
        return min(max(1.0, p.low), p.high)

    def recipe(self, params: dict[str, float], clamp: bool = False) -> Recipe:
        """The Recipe these Optuna parameters describe."""
        merge = self.cfg.merge
        ratios = {name: float(v) for name, v in self.fixed.items()}
        for p in self.params:
            value = _clip(params[p.name], p) if clamp else params[p.name]
            ratios.update({b: float(value) for b in p.blocks})
        te_ratio = self._te_ratio(params)
        clip = None
        if self.te_block is not None:
            ratios[self.te_block] = te_ratio if te_ratio is not None else \
                ratios.get(self.te_block, 1.0)
        elif te_ratio is not None:
            clip = ClipMerge("weighted_sum", ratio=te_ratio)
        multiplier = params.get(MULTIPLIER, merge.multiplier if isinstance(merge.multiplier, float)
                                else 1.0)
        models = {role: Source(path, self.digests.get(path))
                  for role, path in self.source_files().items()}
        return Recipe(arch=self.arch_name, method=merge.method, models=models,
                      vocabulary=merge.vocabulary, ratios={n: ratios[n] for n in self.names},
                      multiplier=float(multiplier), clip=clip, arithmetic=merge.arithmetic,
                      allow_extrapolation=merge.allow_extrapolation,
                      loras=self._loras(params), **self.held_dtypes())

    def held_dtypes(self) -> dict[str, str]:
        """The Recipe's held precisions: the configured ones, else the study's dtype (the
        engine's live weights), so the scored candidate and every export are the same thing."""
        merge, dtype = self.cfg.merge, self.cfg.resolved_dtype()
        return {"unet_dtype": merge.unet_dtype or dtype,
                "text_encoder_dtype": merge.text_encoder_dtype or dtype}

    def source_files(self) -> dict[str, str]:
        """The checkpoints a candidate is built from, by Recipe role."""
        roles = METHODS[self.cfg.merge.method].roles
        return {role: str(getattr(self.cfg.models, role)) for role in roles}

    def lora_files(self) -> dict[str, str]:
        return {f"lora{i}": str(lora.path) for i, lora in enumerate(self.cfg.merge.loras)}

    def _loras(self, params: dict[str, float]) -> tuple[LoraSpec, ...]:
        specs = []
        for i, lora in enumerate(self.cfg.merge.loras):
            strength = params.get(f"lora{i}", lora.strength)
            blocks = {b: float(params.get(f"lora{i}:{b}", 1.0)) for b in lora.blocks}
            specs.append(LoraSpec(str(lora.path), float(strength), blocks or None,
                                  lora.te_strength, self.digests.get(str(lora.path)),
                                  lora.partial))
        return tuple(specs)

    def _te_ratio(self, params: dict[str, float]) -> float | None:
        te = self.cfg.merge.text_encoder
        if te.mode == "model1":
            return None
        return float(params[TEXT_ENCODER]) if TEXT_ENCODER in params else float(te.ratio)

    def block_recipe(self, ratios: dict[str, float]) -> Recipe:
        """The Recipe of per-block ratios of the vocabulary, its text-encoder block (MBW's
        BASE) giving the text-encoder ratio; clipped to the bounds like ``params_for``."""
        return self.recipe(self.params_for({**ratios, TEXT_ENCODER: ratios[self.te_block]}))

    def params_for(self, ratios: dict[str, float], default: float | None = None
                   ) -> dict[str, float]:
        """Optuna parameters for per-block ratios (warm starts, presets): tied groups take
        their mean, values are clipped to bounds, blocks not given take ``default`` (or the
        middle of their bounds). A searched text-encoder ratio is a block's too: ``te_ratio``,
        else the vocabulary's text-encoder block (MBW's BASE), else ``default`` (or 1.0,
        model1's text encoder)."""
        out = {}
        for p in self.params:
            given = [ratios[b] for b in p.blocks if b in ratios]
            fallback = (p.low + p.high) / 2 if default is None else default
            value = sum(given) / len(given) if given else fallback
            out[p.name] = _clip(value, p)
        for p in self.extra:
            value = ratios.get(p.name)
            if p.name == TEXT_ENCODER and value is None:
                value = ratios.get(self.te_block, default) if self.te_block else default
            out[p.name] = _clip(self._extra_default(p) if value is None else value, p)
        return out


def block_roles(params: Mapping[str, Sequence[str]], names: Sequence[str],
                text_encoder: str | None = None, te_block: str | None = None) -> dict[str, str]:
    """Each block's role for the ratio chart: ``searched`` (a parameter of its own),
    ``tied:GROUP`` (one parameter for several blocks) or ``fixed`` (no parameter). ``params``
    maps parameter name -> blocks (the study's ``params`` attribute); ``text_encoder`` names
    the parameter of a searched text-encoder ratio, if any, and ``te_block`` the vocabulary's
    block that holds that ratio (MBW's BASE), if it has one."""
    roles = dict.fromkeys(names, "fixed")
    for name, blocks in params.items():
        for block in blocks:
            roles[block] = "searched" if len(blocks) == 1 else f"tied:{name}"
    if text_encoder is not None and text_encoder in params:
        roles["text encoders"] = "searched"
        if te_block is not None:
            roles[te_block] = "searched"
    return roles


def _clip(value: float, p: Param) -> float:
    return float(min(max(value, p.low), p.high))


def warm_start_params(space: SearchSpace) -> list[tuple[str, dict[str, float]]]:
    """(label, params) of every warm start the config asks for, in order."""
    warm = space.cfg.warm_start
    out = []
    if warm.model1:
        out.append(("model1", space.params_for({}, default=1.0)))
    if warm.model2:
        out.append(("model2", space.params_for({}, default=0.0)))
    for u in warm.uniform:
        out.append((f"uniform {u}", space.params_for({}, default=u)))
    for name, ratios in warm.presets.items():
        out.append((f"preset {name}", space.params_for(ratios)))
    return out + curve_starts(space, warm.curves, space.cfg.sampler.seed)
