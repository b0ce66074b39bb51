"""Samplers by name: the config says `sampler: {name, seed, options}`."""

from __future__ import annotations

from typing import Any

import optuna

from .config import SamplerConfig


def make_sampler(cfg: SamplerConfig, multi_objective: bool) -> optuna.samplers.BaseSampler:
    """tpe (default: multivariate, constant liar for parallel workers), cmaes, gp, qmc, random,
    nsga2. ``options`` go to the sampler's constructor unchanged."""
    options: dict[str, Any] = dict(cfg.options)
    seed = cfg.seed
    if cfg.name == "tpe":
        options.setdefault("multivariate", True)
        options.setdefault("constant_liar", True)
        options.setdefault("n_startup_trials", 10)
        return optuna.samplers.TPESampler(seed=seed, **options)
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **options)
    if cfg.name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **options)
    if cfg.name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, **options)
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed, **options)
    if cfg.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **options)
    raise ValueError(f"sampler.name: unknown sampler {cfg.name!r}")
