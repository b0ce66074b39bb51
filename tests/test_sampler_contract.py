"""Every built-in sampler passes the sampler contract (search/sampler_contract.py)."""

from __future__ import annotations

import pytest

from search.sampler_contract import SamplerContract

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning",
                                        "ignore:Heartbeat of storage:UserWarning")


class TestTpe(SamplerContract):
    sampler = "tpe"
    options = {"n_startup_trials": 5}


class TestCmaEs(SamplerContract):
    sampler = "cmaes"


class TestGp(SamplerContract):
    sampler = "gp"
    options = {"n_startup_trials": 4}
    trials = 8


class TestQmc(SamplerContract):
    sampler = "qmc"


class TestRandom(SamplerContract):
    sampler = "random"


class TestNsga2(SamplerContract):
    sampler = "nsga2"
    options = {"population_size": 4}
