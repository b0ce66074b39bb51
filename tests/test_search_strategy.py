"""Search strategies on the real study path: proposing ahead (the storage lane), block
screening, cheap first probes (fidelity), smooth-curve warm starts, and their config checks.

Expected values come from outside the code under test: the objective's own construction
(which parameters it depends on), numpy's quantile over the stored cheap scores, a cheap score
drawn again here with the engine and the scorer, a cosine-eased curve written out below.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from evaluators import combine, generate, score_images
from evaluators.testing import write_tiny_open_clip
from search import run_folder as rf
from search.config import ConfigError, parse_config
from search.samplers import make_sampler
from search.screening import ATTR_SCREENING, influences
from search.space import Param
from search.study import check_config, optimize, prepare
from search.trial import ATTR_CHEAP, ATTR_CHEAP_BAR

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("clip"), name="strategy-clip", seed=0)


def config_data(fam, clip_files, tmp_path, **over) -> dict:
    data = {
        "name": "s", "models": {"model1": str(fam.a), "model2": str(fam.b)},
        "config_folder": str(fam.config_folder),
        "merge": {"vocabulary": "mbw", "arithmetic": "fast"},
        "probes": {"prompts": ["a red apple", "a blue cube"], "seeds": [1], "steps": 2,
                   "cfg": 4.0, "width": 64, "height": 64},
        "scorers": [{"kind": "clip", "model": str(clip_files[0]),
                     "weights": str(clip_files[1])}],
        "sampler": {"name": "tpe", "seed": 3},
        "warm_start": {"model1": False, "model2": False, "uniform": []},
        "trials": 6, "output": str(tmp_path / "runs"), "device": "cpu",
    }
    data.update(over)
    return data


def problems(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    return str(err.value)


# ---------------------------------------------------------------------------- config


def test_strategy_options_are_validated_with_field_paths(tiny_sd1, clip_files, tmp_path):
    data = config_data(tiny_sd1, clip_files, tmp_path)
    assert "screening.after:" in problems({**data, "screening": {"after": 5}})
    assert "screening.threshold:" in problems({**data, "screening": {"threshold": 1.5}})
    assert "did you mean after" in problems({**data, "screening": {"aftr": 20}})
    # against the searched parameters (25 MBW blocks here): at least 2 x 25 + 10 trials
    with pytest.raises(ConfigError, match=r"screening.after: 40 trials are too few to estimate "
                       r"the influence of 25 searched parameters .* use at least 60"):
        check_config(parse_config({**data, "trials": 100, "screening": {"after": 40}}))
    with pytest.raises(ConfigError, match=r"screening.after: 60 is not below trials \(60\)"):
        check_config(parse_config({**data, "trials": 60, "screening": {}}))
    check_config(parse_config({**data, "trials": 61, "screening": {}}))
    text = problems({**data, "fidelity": {"steps": 2}})
    assert "fidelity.steps: 2 is not below probes.steps (2)" in text
    assert "fidelity.steps:" in problems({**data, "fidelity": {}})  # required
    assert "fidelity.keep:" in problems({**data, "fidelity": {"steps": 1, "keep": 1.0}})
    text = problems({**data, "objective": "multi", "fidelity": {"steps": 1}})
    assert "fidelity: works on one scored objective" in text
    assert "warm_start.curves:" in problems({**data, "warm_start": {"curves": -1}})
    cfg = parse_config({**data, "trials": 60, "screening": {"after": 20},
                        "fidelity": {"steps": 1}, "warm_start": {"curves": 3}})
    assert (cfg.screening.after, cfg.screening.threshold) == (20, 0.1)
    assert parse_config({**data, "screening": {}}).screening.after is None  # 2 x params + 10
    assert (cfg.fidelity.steps, cfg.fidelity.keep, cfg.fidelity.warmup) == (1, 0.5, 10)


# ---------------------------------------------------------------------------- proposing ahead


def _cheap_objective(trial, ctx=None):
    return -sum((trial.suggest_float(n, 0, 1) - 0.3) ** 2 for n in ("a", "b", "c"))


@pytest.mark.parametrize("ahead", [True, False])
def test_the_next_trial_is_proposed_while_one_draws(tmp_path, ahead):
    """Proposed ahead, trial N+1 exists (asked, its parameters proposed) before trial N is
    stored; in turn, only after. Either way every record is stored before the trial's value."""
    storage = rf.open_storage(rf.default_storage(tmp_path))
    study = optuna.create_study(storage=storage, sampler=make_sampler("tpe", 0, {}),
                                direction="maximize")

    def draw(trial, ctx):
        value = _cheap_objective(trial)
        time.sleep(0.15)  # an accelerator drawing
        return value

    ctx = SimpleNamespace(cfg=SimpleNamespace(trials=6, timeout=None, objective="weighted",
                                              propose_ahead=ahead))
    seen = []
    result = optimize(study, ctx, trials=6, log=lambda m: None, run=draw,
                      propose=_cheap_objective,
                      callbacks=[lambda s, t: seen.append(t.state)])
    assert result.completed == 6 and seen == [COMPLETE] * 6
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state for t in trials] == [COMPLETE] * 6  # nothing left over, none handed back
    overlaps = [later.datetime_start < earlier.datetime_complete
                for earlier, later in zip(trials, trials[1:])]
    assert all(overlaps) if ahead else not any(overlaps)


# ---------------------------------------------------------------------------- screening


def test_influence_of_an_additive_quadratic_is_its_range():
    """y = 3·x0² - 0.5·x1 over [0, 1]²: the ranges of the two terms are 3 and 0.5; x2 does
    nothing. Independent: the ranges of the terms written out."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(80, 3))
    y = 3 * x[:, 0] ** 2 - 0.5 * x[:, 1]
    found = influences(x.tolist(), y.tolist(), [(0, 1)] * 3, ridge=1e-6)
    assert found[0] == pytest.approx(3.0, rel=0.02)
    assert found[1] == pytest.approx(0.5, rel=0.02)
    assert found[2] < 0.01
    # bounds other than [0, 1]: the same function of the scaled ratio, the same influences
    wide = influences((x * 2 - 1).tolist(), y.tolist(), [(-1, 1)] * 3, ridge=1e-6)
    assert wide == pytest.approx(found, abs=1e-6)


def test_screening_fixes_the_parameters_that_do_nothing(tmp_path):
    """An objective of two of six parameters: after 20 trials the other four are fixed at the
    best trial's values (by construction they do nothing), and every later trial has them."""
    names = ["IN00", "IN01", "M00", "OUT00", "OUT01", "OUT02"]
    space = SimpleNamespace(all_params=lambda: [Param(n, (n,), 0.0, 1.0) for n in names])

    def objective(trial, ctx=None):
        v = {n: trial.suggest_float(n, 0.0, 1.0) for n in names}
        return -(v["IN01"] - 0.7) ** 2 - 0.5 * (v["OUT01"] - 0.2) ** 2

    storage = rf.open_storage(rf.default_storage(tmp_path))
    study = optuna.create_study(storage=storage, sampler=make_sampler("random", 0, {}),
                                direction="maximize")
    cfg = SimpleNamespace(trials=30, timeout=None, objective="weighted",
                          screening=SimpleNamespace(after=20, threshold=0.1))
    lines = []
    optimize(study, SimpleNamespace(cfg=cfg, space=space), log=lines.append,
             run=objective, propose=objective)
    decision = study.user_attrs[ATTR_SCREENING]
    first = sorted(rf.completed(study), key=lambda t: t.number)[:20]
    best = max(first, key=lambda t: (t.value, -t.number))
    idle = ["IN00", "M00", "OUT00", "OUT02"]
    assert decision["fixed"] == {n: best.params[n] for n in idle}, decision
    assert decision["best_trial"] == best.number
    later = [t for t in study.trials if t.number >= decision["from_trial"]]
    assert decision["from_trial"] <= 22 and len(later) >= 8
    for trial in later:
        assert {n: trial.params[n] for n in idle} == decision["fixed"]
    assert len({t.params["IN01"] for t in later}) == len(later)  # still searched
    assert any(line.startswith("screening after 20 trials: 4 of 6 parameters") and
               "searching 2: IN01, OUT01" in line for line in lines)
    from optuna_dashboard._note import get_note_from_system_attrs

    attrs = study._storage.get_study_system_attrs(study._study_id)
    body = get_note_from_system_attrs(attrs, None)["body"]
    assert "### Block screening" in body and "| OUT02 |" in body and "fixed at" in body


def test_screening_on_a_real_study_says_so_and_resumes_with_it(tiny_sd1, clip_files, tmp_path,
                                                               capsys):
    data = config_data(tiny_sd1, clip_files, tmp_path, trials=20,
                       merge={"vocabulary": "blocks", "arithmetic": "fast"},
                       screening={"threshold": 0.99})  # after: 2 x 3 + 10 = 16
    cfg = parse_config(data)
    study, ctx = prepare(cfg, log=lambda m: None)
    logged = []
    optimize(study, ctx, log=logged.append)
    decision = study.user_attrs[ATTR_SCREENING]
    first = sorted(rf.completed(study), key=lambda t: t.number)[:16]
    best = max(first, key=lambda t: (t.value, -t.number))
    assert decision["after"] == 16 and decision["best_trial"] == best.number
    searched = [n for n in decision["influence"] if n not in decision["fixed"]]
    assert searched == [max(decision["influence"], key=decision["influence"].get)]
    assert len(decision["fixed"]) == len(ctx.space.all_params()) - 1
    assert decision["fixed"] == {n: best.params[n] for n in decision["fixed"]}
    for trial in study.trials:
        if trial.number >= decision["from_trial"]:
            assert {n: trial.params[n] for n in decision["fixed"]} == decision["fixed"]
    assert sum(line.startswith("screening after 16 trials") for line in logged) == 1
    # a resumed run applies the stored decision (and says so) without deciding again
    study, ctx = prepare(cfg, log=lambda m: None)
    logged.clear()
    optimize(study, ctx, trials=23, log=logged.append)
    assert study.user_attrs[ATTR_SCREENING] == decision
    assert sum(line.startswith("screening after 16 trials") for line in logged) == 1
    for trial in rf.completed(study)[-3:]:
        assert {n: trial.params[n] for n in decision["fixed"]} == decision["fixed"]


# ---------------------------------------------------------------------------- fidelity


def test_cheap_probes_prune_below_the_bar_and_cost_no_budget(tiny_sd1, clip_files, tmp_path):
    data = config_data(tiny_sd1, clip_files, tmp_path, trials=10,
                       fidelity={"steps": 1, "keep": 0.5, "warmup": 3})
    cfg = parse_config(data)
    study, ctx = prepare(cfg, log=lambda m: None)
    result = optimize(study, ctx, log=lambda m: None)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert result.completed == 10 and sum(t.state == COMPLETE for t in trials) == 10
    pruned = [t for t in trials if t.state == PRUNED]
    assert pruned, "half the candidates after the warm-up should score below the median"
    scores = {t.number: t.user_attrs[ATTR_CHEAP] for t in trials}
    for t in trials:
        bar = t.user_attrs.get(ATTR_CHEAP_BAR)
        if bar is None:
            continue
        # the median of every cheap score stored when it was proposed: all the trials before
        # it, or all but the one still drawing then (proposed ahead)
        medians = [float(np.quantile([scores[n] for n in range(k)], 0.5))
                   for k in (t.number, t.number - 1) if k >= 3]
        assert any(math.isclose(bar, m, rel_tol=1e-9) for m in medians), (t.number, bar)
        assert (t.state == PRUNED) == (scores[t.number] < bar)
    assert sum(t.user_attrs.get(ATTR_CHEAP_BAR) is None for t in trials) >= 3  # the warm-up
    # a pruned trial's cheap score is its candidate drawn with the probes' steps cut to 1
    trial = pruned[0]
    ctx.engine.apply(ctx.space.recipe(trial.params))
    images = generate(ctx.pipe, ctx.probes.model_copy(update={"steps": 1}))
    again = combine(score_images(images, ctx.scorers), ctx.norms)
    assert again == pytest.approx(trial.user_attrs[ATTR_CHEAP], abs=1e-6)
    assert rf.ATTR_RECIPE not in trial.user_attrs  # never drawn in full
    # TPE ranks pruned trials by their last intermediate value: the cheap score
    assert all(t.intermediate_values == {0: t.user_attrs[ATTR_CHEAP]} for t in pruned)


# ---------------------------------------------------------------------------- curves


def eased(control, t):
    """The curve through evenly spaced control points, cosine-eased between neighbours."""
    segments = len(control) - 1
    i = min(int(t * segments), segments - 1)
    u = t * segments - i
    return control[i] + (control[i + 1] - control[i]) * (1 - math.cos(math.pi * u)) / 2


def test_curve_warm_starts_are_smooth_shapes_over_depth(tiny_sd1, clip_files, tmp_path):
    data = config_data(tiny_sd1, clip_files, tmp_path, warm_start={
        "model1": False, "model2": False, "uniform": [], "curves": 5})
    cfg = parse_config(data)
    study, ctx = prepare(cfg, log=lambda m: None)
    queued = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs["warm_start"].split(" (")[0] for t in queued] == \
        [f"curve {k}" for k in range(1, 6)]
    order = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    shapes = set()
    for trial in queued:
        params = trial.system_attrs["fixed_params"]
        control = [float(c) for c in trial.user_attrs["warm_start"].split("(")[1][:-1].split("-")]
        for i, block in enumerate(order):
            assert params[block] == pytest.approx(eased(control, i / 24), abs=0.006), block
        shapes.add(tuple(control))
    assert len(shapes) == 5
    again = prepare(parse_config({**data, "name": "s2"}), log=lambda m: None)[0]
    other = prepare(parse_config({**data, "name": "s3", "sampler": {"name": "tpe", "seed": 4}}),
                    log=lambda m: None)[0]

    def labels(s):
        return [t.user_attrs["warm_start"] for t in s.trials]

    assert labels(again) == [t.user_attrs["warm_start"] for t in queued]
    assert labels(other) != labels(again)


def test_warm_starts_set_a_searched_text_encoder_ratio_like_the_blocks(tiny_sd1, clip_files,
                                                                      tmp_path):
    """model2 is model2's text encoder too (ratio 0), a uniform start its value, a preset its
    BASE; a preset without BASE keeps model1's text encoder (1.0)."""
    mbw = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    data = config_data(tiny_sd1, clip_files, tmp_path, warm_start={
        "model1": True, "model2": True, "uniform": [0.25],
        "presets": {"low_te": {"BASE": 0.3, **dict.fromkeys(mbw, 0.6)},
                    "no_base": dict.fromkeys(mbw, 0.4)}})
    data["merge"] = {**data["merge"], "text_encoder": {"mode": "merge",
                                                       "ratio": {"low": 0.0, "high": 1.0}}}
    study, _ = prepare(parse_config(data), log=lambda m: None)
    queued = {t.user_attrs["warm_start"]: t.system_attrs["fixed_params"] for t in study.trials}
    expected = {"model1": (1.0, 1.0), "model2": (0.0, 0.0), "uniform 0.25": (0.25, 0.25),
                "preset low_te": (0.6, 0.3), "preset no_base": (0.4, 1.0)}
    assert set(queued) == set(expected)
    for label, (blocks, te) in expected.items():
        assert all(queued[label][b] == blocks for b in mbw), label
        assert queued[label]["te_ratio"] == te, label


def test_a_trial_asked_for_but_never_marked_is_stale_after_the_grace_period(tmp_path):
    """A worker killed between `ask` and marking its trial leaves it RUNNING with no worker and
    no heartbeat; without this rule every other worker would wait for it forever."""
    from search.liveness import fail_stale_trials

    storage = rf.open_storage(rf.default_storage(tmp_path), 1, 2)
    study = optuna.create_study(storage=storage, direction="maximize")
    orphan = study.ask()
    assert fail_stale_trials(study) == []  # younger than the grace period: left alone
    time.sleep(2.2)
    assert fail_stale_trials(study) == [orphan.number]


def test_screening_waits_until_its_first_trials_can_no_longer_change(tmp_path):
    """Screening decides from the first `after` COMPLETE trials by number. While a trial
    numbered below them still runs (another worker's), that set could still change, so two
    workers deciding at once could fix different blocks: no decision until it ends, then one
    from the first `after` trials including it."""
    from search.screening import Screening

    names = ["IN00", "IN01", "M00"]
    space = SimpleNamespace(all_params=lambda: [Param(n, (n,), 0.0, 1.0) for n in names])
    study = optuna.create_study(storage=rf.open_storage(rf.default_storage(tmp_path)),
                                direction="maximize")
    dist = {n: optuna.distributions.FloatDistribution(0.0, 1.0) for n in names}
    early = study.ask(dist)  # trial 0, still running (a live worker's)
    rng = np.random.default_rng(3)
    for _ in range(20):  # trials 1..20
        params = dict(zip(names, rng.uniform(0, 1, 3).tolist()))
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dist,
                                                  value=-(params["IN01"] - 0.7) ** 2))
    screening = Screening(20, 0.1, space, log=lambda line: None)
    screening.before_proposal(study)
    assert ATTR_SCREENING not in study.user_attrs and not screening.applied
    study.tell(early, 1.0)  # the best of all
    screening.before_proposal(study)
    decision = study.user_attrs[ATTR_SCREENING]
    assert decision["best_trial"] == 0  # from trials 0..19, not 1..20
