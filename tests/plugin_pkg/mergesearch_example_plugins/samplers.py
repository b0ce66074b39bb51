"""A sampler of one's own: independent uniform draws from one seeded generator."""

from __future__ import annotations

import numpy as np
from optuna.distributions import FloatDistribution
from optuna.samplers import BaseSampler, RandomSampler


class UniformSampler(BaseSampler):
    """Each float parameter uniform in its bounds, in the order the trial asks for them."""

    def __init__(self, seed: int | None = None):
        self._rng = np.random.RandomState(seed)
        self._fallback = RandomSampler(seed=seed)

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if isinstance(param_distribution, FloatDistribution) and not param_distribution.log \
                and param_distribution.step is None:
            low, high = param_distribution.low, param_distribution.high
            return float(low + self._rng.rand() * (high - low))
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self._rng = np.random.RandomState()
        self._fallback.reseed_rng()
