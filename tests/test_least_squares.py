"""The ``lsq`` sampler (search/least_squares.py): the sampler contract with residuals stored,
its step against numpy's least squares, convergence to a hidden point, and a real study whose
trials store the paired reference scorer's residual.

Expected values come from outside the code under test: ``np.linalg.lstsq``, the optimality
condition of a trust-region step written out below, the hidden point of a made-up residual, the
identity ``e.r = 1 - |e - r|^2 / 2`` for unit vectors, and the embeddings the scorer's backbone
gives when asked directly.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from PIL import Image

from evaluators.testing import write_tiny_open_clip
from search import run_folder as rf
from search.config import ConfigError, parse_config
from search.least_squares import (
    ATTR_RESIDUAL,
    ATTR_STEP,
    STALL,
    bounded_step,
    decode_residual,
    encode_residual,
    trust_region_step,
)
from search.progress import Progress
from search.sampler_contract import SamplerContract
from search.samplers import make_sampler
from search.study import optimize, prepare
from search.worker import optimize as worker_optimize

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning",
                                        "ignore:Heartbeat of storage:UserWarning")
COMPLETE = optuna.trial.TrialState.COMPLETE


class TestLeastSquares(SamplerContract):
    """The contract's objective stores its residual, so from trial 8 (6 parameters + 2) the
    steps propose: bounds, replays, resumes and the worker loop are checked on them."""

    sampler = "lsq"
    options = {"global_trials": 4}
    trials = 16


def test_a_step_that_fits_is_the_least_squares_solution():
    rng = np.random.default_rng(0)
    jacobian, residual = rng.normal(size=(30, 5)), rng.normal(size=30)
    expected = -np.linalg.lstsq(jacobian, residual, rcond=None)[0]
    step = trust_region_step(jacobian, residual, radius=1e6)
    np.testing.assert_allclose(step, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("radius", [0.02, 0.15])
def test_a_step_held_by_the_radius_is_on_it_and_optimal(radius):
    """|s| = radius, and s = -(J'J + l I)^-1 J'r for some l >= 0 (the trust-region step's
    optimality condition): J'(r + J s) is -l times s."""
    rng = np.random.default_rng(1)
    jacobian, residual = rng.normal(size=(30, 5)), rng.normal(size=30)
    assert np.linalg.norm(np.linalg.lstsq(jacobian, residual, rcond=None)[0]) > radius
    step = trust_region_step(jacobian, residual, radius)
    assert np.linalg.norm(step) == pytest.approx(radius, rel=1e-6)
    gradient = jacobian.T @ (residual + jacobian @ step)
    damping = -gradient @ step / (step @ step)
    assert damping > 0
    np.testing.assert_allclose(gradient, -damping * step, atol=1e-6 * np.abs(gradient).max())


def test_a_step_from_a_bound_holds_the_coordinates_it_would_push_outwards():
    """From a point on two bounds, with no radius in the way: the bounded linear least-squares
    solution (scipy's lsq_linear) where the bounds the point is on are the only ones that bind."""
    from scipy.optimize import lsq_linear

    rng = np.random.default_rng(5)
    jacobian = rng.normal(size=(40, 6))
    centre = np.array([0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    pushed = np.array([-0.2, 0.3, 0.05, -0.05, 0.02, 0.01])  # outwards on both bounds
    residual = -jacobian @ pushed
    expected = lsq_linear(jacobian, -residual, bounds=(-centre, 1 - centre)).x
    assert np.all(np.abs(expected[2:]) < 0.4)  # only the two bounds the point is on bind
    step = bounded_step(jacobian, residual, 10.0, centre)
    np.testing.assert_allclose(step, expected, atol=1e-7)
    assert step[0] == 0 and step[1] == 0


def test_residuals_keep_their_float32_values():
    vector = np.random.default_rng(2).normal(size=1024) * 1e-3
    np.testing.assert_array_equal(decode_residual(encode_residual(vector)),
                                  vector.astype(np.float32).astype(np.float64))


# a made-up least-squares problem: 10 ratios, a residual of 60 numbers, smooth and nonlinear,
# zero at HIDDEN
DIMENSIONS = 10
_RNG = np.random.default_rng(3)
MATRIX = _RNG.normal(size=(60, DIMENSIONS)) * np.geomspace(1.0, 0.1, DIMENSIONS)
HIDDEN = _RNG.uniform(0.1, 0.9, DIMENSIONS)


def _best_point(study: optuna.Study) -> np.ndarray:
    return np.array([study.best_trial.params[f"x{i}"] for i in range(DIMENSIONS)])


def _hidden_point_study(sampler: str, options: dict, trials: int, ahead: bool = True
                        ) -> optuna.Study:
    """A study on the made-up problem, run by the worker loop (proposing ahead, as a study
    does, unless ``ahead`` is False) with the residual stored as a study stores it."""
    study = optuna.create_study(direction="maximize", sampler=make_sampler(sampler, 0, options))
    study.enqueue_trial({f"x{i}": 0.5 for i in range(DIMENSIONS)})

    def propose(trial, ctx=None):
        return [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(DIMENSIONS)]

    def run(trial, ctx):
        x = np.array(propose(trial))
        residual = 0.3 * np.tanh(MATRIX @ (x - HIDDEN))
        study._storage.set_trial_system_attr(trial._trial_id, ATTR_RESIDUAL,
                                             encode_residual(residual))
        return 1.0 - residual @ residual / 2

    ctx = SimpleNamespace(cfg=SimpleNamespace(trials=trials, timeout=None, objective="weighted",
                                              propose_ahead=ahead))
    worker_optimize(study, ctx, trials=trials, log=lambda m: None, run=run, propose=propose)
    return study


def test_the_steps_find_the_hidden_point_that_cmaes_alone_does_not():
    """80 trials, the first 22 CMA-ES's: the steps land on the hidden point; CMA-ES alone,
    same seed and budget, is still far off (what the steps add)."""
    stepped = _best_point(_hidden_point_study("lsq", {}, 80))
    alone = _best_point(_hidden_point_study("cmaes", {}, 80))
    assert np.sqrt(np.mean((stepped - HIDDEN) ** 2)) < 1e-3
    assert np.sqrt(np.mean((alone - HIDDEN) ** 2)) > 0.02


def test_steps_that_stall_hand_the_study_back_to_cmaes():
    """A study whose value only falls (trial 0, a warm start, stays the best whatever the
    residual says): after STALL + dimensions steps and probes without a better value, CMA-ES
    proposes again, and goes on doing so while nothing beats the best."""
    study = optuna.create_study(direction="maximize",
                                sampler=make_sampler("lsq", 0, {"global_trials": 12}))
    study.enqueue_trial({f"x{i}": 0.5 for i in range(DIMENSIONS)})

    def propose(trial, ctx=None):
        return [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(DIMENSIONS)]

    def run(trial, ctx):
        residual = 0.3 * np.tanh(MATRIX @ (np.array(propose(trial)) - HIDDEN))
        study._storage.set_trial_system_attr(trial._trial_id, ATTR_RESIDUAL,
                                             encode_residual(residual))
        return -float(trial.number)

    ctx = SimpleNamespace(cfg=SimpleNamespace(trials=60, timeout=None, objective="weighted",
                                              propose_ahead=False))
    worker_optimize(study, ctx, trials=60, log=lambda m: None, run=run, propose=propose)
    stepped = [t.number for t in sorted(study.trials, key=lambda t: t.number)
               if ATTR_STEP in t.system_attrs]
    assert stepped == list(range(12, 12 + STALL + DIMENSIONS))


@pytest.mark.parametrize("ahead", [True, False])
def test_probes_come_after_two_steps_and_while_a_step_draws(ahead):
    """A probe lies 0.03 from its best (ratios in [0, 1] here); in turn, a probe follows every
    two steps; proposed ahead, a step is never proposed while a step from the same best draws
    (trial n + 1 is proposed while trial n draws), so no two trials in a row are steps from one
    best."""
    study = _hidden_point_study("lsq", {}, 60, ahead=ahead)
    trials = {t.number: t for t in study.get_trials()}
    records = [(n, trials[n].system_attrs[ATTR_STEP]) for n in sorted(trials)
               if ATTR_STEP in trials[n].system_attrs]
    assert len(records) >= 25
    point = {n: np.array([t.params[f"x{i}"] for i in range(DIMENSIONS)])
             for n, t in trials.items()}
    for n, record in records:
        if record["probe"]:
            assert np.linalg.norm(point[n] - point[record["from"]]) == pytest.approx(0.03, abs=1e-9)
    kinds = "".join("p" if r["probe"] else "s" for _, r in records)
    if ahead:
        assert not any(a["from"] == b["from"] and not a["probe"] and not b["probe"]
                       for (m, a), (n, b) in zip(records, records[1:]) if n == m + 1), kinds
    else:
        assert "sss" not in kinds and kinds.count("p") >= len(kinds) // 3, kinds


# ---------------------------------------------------------------------------- a real study


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("clip"), name="lsq-clip", seed=0)


def _study_data(fam, clip_files, tmp_path: Path, scorers: list[dict], **over) -> dict:
    return {
        "name": "lsq", "models": {"model1": str(fam.a), "model2": str(fam.b)},
        "config_folder": str(fam.config_folder),
        "merge": {"vocabulary": "mbw", "arithmetic": "fast"},
        "probes": {"prompts": ["a red apple", "a blue cube"], "seeds": [1], "steps": 2,
                   "cfg": 4.0, "width": 64, "height": 64},
        "scorers": scorers, "sampler": {"name": "lsq", "seed": 1},
        "warm_start": {"model1": True, "model2": True, "uniform": [0.5]},
        "trials": 34, "output": str(tmp_path / "runs"), "device": "cpu", **over,
    }


def _reference(clip_files, folder: Path | None = None, mode: str = "paired") -> dict:
    scorer = {"kind": "reference", "model": str(clip_files[0]), "weights": str(clip_files[1]),
              "mode": mode}
    return scorer | ({"references": str(folder)} if folder else {})


def _reference_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "references"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(2):  # one per probe, in probe order (sorted by file name)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_a_study_stores_the_residual_its_score_comes_from_and_steps_on_it(tiny_sd1, clip_files,
                                                                          tmp_path):
    scorers = [_reference(clip_files, _reference_folder(tmp_path))]
    cfg = parse_config(_study_data(tiny_sd1, clip_files, tmp_path, scorers,
                                   sampler={"name": "lsq", "seed": 1,
                                            "options": {"global_trials": 3}}))
    study, ctx = prepare(cfg, log=lambda m: None)
    result = optimize(study, ctx, log=lambda m: None)
    assert result.completed == 34
    trials = sorted(study.get_trials(states=(COMPLETE,)), key=lambda t: t.number)
    dimensions = len(trials[-1].params)
    for trial in trials:  # the score, two probes of equal weight: 1 - |R|^2 / 2
        residual = decode_residual(trial.system_attrs[ATTR_RESIDUAL])
        assert residual.size == 2 * 32  # two probes x the tiny CLIP's 32 dimensions
        assert 1 - residual @ residual / 2 == pytest.approx(
            trial.user_attrs[rf.ATTR_SCORES]["reference"], abs=2e-6)
    # the steps take over once dimensions + 2 trials hold a residual (global_trials' floor,
    # above the 3 asked for); the trial that many COMPLETE trials after the start, or the one
    # after it when the next trial was proposed while the one before drew
    stepped = [t.number for t in trials if ATTR_STEP in t.system_attrs]
    assert stepped and stepped == list(range(stepped[0], 34))
    assert stepped[0] in (dimensions + 2, dimensions + 3)
    # the progress line says which trials the steps chose, and from where
    out = io.StringIO()
    progress = Progress(34, stream=out)
    for trial in trials[-3:]:
        progress(study, trial)
    record = trials[-1].system_attrs[ATTR_STEP]
    kind = "probe" if record["probe"] else f"step of {record['radius']:.3g}"
    assert out.getvalue().splitlines()[-1].count(f" [lsq {kind} from trial {record['from']}]") == 1
    # the residual is e - r of the probe images' and the references' embeddings
    trial = trials[-1]
    ctx.engine.apply(ctx.space.recipe(trial.params))
    from evaluators import generate

    images = generate(ctx.pipe, ctx.probes).images
    scorer = ctx.scorers[0]
    expected = (scorer.image_embeddings(images) - scorer.reference_embeddings.cpu()) / np.sqrt(2)
    np.testing.assert_allclose(decode_residual(trial.system_attrs[ATTR_RESIDUAL]),
                               expected.flatten().double().numpy(), atol=1e-5)


def test_the_sampler_asks_for_one_objective_scorer_that_gives_residuals(tiny_sd1, clip_files,
                                                                        tmp_path):
    clip = {"kind": "clip", "model": str(clip_files[0]), "weights": str(clip_files[1])}
    for scorers, named in (([clip], "clip"), ([_reference(clip_files, mode="mean")], "reference"),
                           ([_reference(clip_files), clip], "reference, clip")):
        with pytest.raises(ConfigError, match=rf"sampler.name: lsq fits the residuals of the "
                           rf"study's only objective scorer, .* objective scorers: {named}"):
            parse_config(_study_data(tiny_sd1, clip_files, tmp_path, scorers))
    # a penalty beside it is not an objective
    parse_config(_study_data(tiny_sd1, clip_files, tmp_path,
                             [_reference(clip_files), {"kind": "sanity"}]))


def test_a_study_whose_only_objective_is_a_paired_reference_steps_by_default(tiny_sd1, clip_files,
                                                                            tmp_path):
    clip = {"kind": "clip", "model": str(clip_files[0]), "weights": str(clip_files[1])}
    expected = [([_reference(clip_files)], "lsq"),
                ([_reference(clip_files), {"kind": "sanity"}], "lsq"),
                ([_reference(clip_files, mode="mean")], "cmaes"),
                ([clip], "cmaes"),
                ([_reference(clip_files), clip], "cmaes"),
                ([_reference(clip_files), clip | {"weight": 0}], "lsq")]
    for scorers, name in expected:
        data = _study_data(tiny_sd1, clip_files, tmp_path, scorers)
        del data["sampler"]
        assert parse_config(data).sampler.name == name, scorers
        assert parse_config(data | {"sampler": {"seed": 3}}).sampler.name == name
    data = _study_data(tiny_sd1, clip_files, tmp_path, [_reference(clip_files)],
                       sampler={"name": "cmaes"})
    assert parse_config(data).sampler.name == "cmaes"  # named: kept
    assert parse_config(data | {"objective": "multi", "sampler": {"seed": 0}}).sampler.name \
        == "tpe"
