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


def _qmc_points(seed: int) -> list[dict[str, float]]:
    import optuna

    from search.samplers import make_sampler

    study = optuna.create_study(sampler=make_sampler("qmc", seed, {}))
    for _ in range(6):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1))
    return [t.params for t in study.trials[1:]]  # trial 0 is drawn by the independent sampler


def test_qmc_honours_its_seed():
    """Optuna's QMCSampler ignores its seed unless scrambled (seen: seeds 0 and 1 gave the
    same study); the registry's qmc scrambles."""
    assert _qmc_points(0) == _qmc_points(0)
    assert _qmc_points(0) != _qmc_points(1)


def test_gp_runs_without_the_greenlet_fallback(recwarn):
    """Optuna falls back to a slow sequential L-BFGS-B, with a warning, without greenlet."""
    import optuna

    from search.samplers import make_sampler

    study = optuna.create_study(sampler=make_sampler("gp", 0, {"n_startup_trials": 3}))
    study.optimize(lambda t: -(t.suggest_float("x", 0, 1) - 0.3) ** 2
                   - (t.suggest_float("y", 0, 1) - 0.6) ** 2, n_trials=6)
    from optuna._gp import batched_lbfgsb

    assert batched_lbfgsb._greenlet_imports.is_successful()
    assert not [w for w in recwarn if "greenlet" in str(w.message)]
    # the next trial's fresh instance starts from the fitted kernel, not from scratch
    study.sampler.before_trial(study, study.trials[-1])
    assert study.sampler.inner._gprs_cache_list is not None


@pytest.mark.parametrize("name,options", [("cmaes", {"n_startup_trials": 3}),
                                          ("tpe", {"n_startup_trials": 3})])
def test_a_reseeded_sampler_proposes_what_a_fresh_optuna_sampler_does(name, options, tmp_path):
    """The registry keeps the intersection search space across the per-trial rebuilds and
    reads it through Optuna's per-trial cache; the proposals must be those of a sampler built
    anew for each trial, as Optuna's own class is (the oracle: a plain loop, SQLite both).
    Not the GP: it carries its fitted kernel on purpose, so its fits start elsewhere."""
    import optuna

    from search.samplers import SAMPLERS, make_sampler, trial_seed

    def objective(params: dict[str, float]) -> float:
        return -sum((v - 0.1 * i) ** 2 for i, v in enumerate(params.values()))

    def run(sampler_for) -> list[dict[str, float]]:
        storage = f"sqlite:///{tmp_path / f'{len(list(tmp_path.iterdir()))}.db'}"
        study = optuna.create_study(storage=storage, direction="maximize")
        for number in range(8):
            study.sampler = sampler_for(number)
            trial = study.ask()
            study.tell(trial, objective({f"b{i}": trial.suggest_float(f"b{i}", 0, 1)
                                         for i in range(4)}))
        return [t.params for t in study.trials]

    ours = make_sampler(name, 5, options)
    entry = SAMPLERS[name]
    kwargs = {**entry.defaults, **options}
    fresh = run(lambda n: entry.sampler_class()(seed=trial_seed(5, n), **kwargs))
    assert run(lambda n: ours) == fresh


def test_the_intersection_search_space_is_carried_across_trials():
    import optuna

    from search.samplers import TrialCachedSpace, make_sampler

    study = optuna.create_study(sampler=make_sampler("cmaes", 0, {}))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    space = study.sampler.inner._search_space
    assert isinstance(space, TrialCachedSpace)
    study.sampler.before_trial(study, study.trials[-1])
    assert study.sampler.inner._search_space is space
