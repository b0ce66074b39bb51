"""Preference and mixed studies without a browser: config rules, the stored choices read as
optuna-dashboard reads them, the scorers' shortlist, a scripted person steering the GP across a
resume, labelled probe grids and the ratio chart's roles. tests/test_browser.py clicks."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import threading
import time

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from evaluators import ProbeImages
from evaluators.testing import write_tiny_open_clip
from merge_backend import Recipe, Source
from merge_backend.export import ratio_chart_svg
from search import preference
from search import run_folder as rf
from search.artifacts import _HEADER_H, _LABEL_W, MIN_CELL, labelled_grid
from search.config import ConfigError, parse_config
from search.study import optimize, prepare

pytest.importorskip("botorch", reason="the preference extra (botorch) is not installed")


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("clip"), name="pref-clip", seed=0)


def config(fam, clip_files, tmp_path, name, **over):
    data = {
        "name": name,
        "models": {"model1": str(fam.a), "model2": str(fam.b)},
        "config_folder": str(fam.config_folder),
        "merge": {"vocabulary": "blocks"},
        "probes": {"prompts": ["a red apple"], "seeds": [1, 2], "steps": 2, "width": 64,
                   "height": 64},
        "scorers": [{"kind": "clip", "model": str(clip_files[0]), "weights": str(clip_files[1])}],
        "objective": "preference",
        "warm_start": {"model1": False, "model2": False, "uniform": []},
        "trials": 4,
        "output": str(tmp_path / "runs"),
        "device": "cpu",
        **over,
    }
    return parse_config(data)


# ---------------------------------------------------------------------------- config


def test_config_rules(tiny_sd1, clip_files, tmp_path):
    cfg = config(tiny_sd1, clip_files, tmp_path, "p", scorers=[])
    assert cfg.sampler.name == "preferential_gp" and cfg.preference.candidates == 4
    assert config(tiny_sd1, clip_files, tmp_path, "p", sampler={"seed": 3}).sampler.name \
        == "preferential_gp"
    with pytest.raises(ConfigError, match="sampler.name: tpe learns from scores"):
        config(tiny_sd1, clip_files, tmp_path, "p", sampler={"name": "tpe"})
    with pytest.raises(ConfigError, match="sampler.name: preferential_gp learns from a person"):
        config(tiny_sd1, clip_files, tmp_path, "p", objective="weighted",
               sampler={"name": "preferential_gp"})
    with pytest.raises(ConfigError, match="scorers: objective mixed needs at least one scorer"):
        config(tiny_sd1, clip_files, tmp_path, "p", objective="mixed", scorers=[])
    with pytest.raises(ConfigError, match="preference.pool"):
        config(tiny_sd1, clip_files, tmp_path, "p", preference={"pool": 1})


# ---------------------------------------------------------------------------- storage format


def test_choices_are_read_as_optuna_dashboard_reads_them(tmp_path):
    from optuna_dashboard._preferential_history import NewHistory, remove_history, report_history
    from optuna_dashboard.preferential import create_study
    from optuna_dashboard.preferential._system_attrs import (
        get_preferences,
        get_skipped_trial_ids,
        report_skip,
    )

    study = create_study(n_generate=3, storage=f"sqlite:///{tmp_path / 'p.db'}",
                         sampler=optuna.samplers.RandomSampler(seed=0), study_name="p")
    inner = optuna.load_study(study_name="p", storage=f"sqlite:///{tmp_path / 'p.db'}")
    for _ in range(5):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.set_user_attr(preference.ATTR_CANDIDATE, "its picture")
    storage, sid = inner._storage, inner._study_id
    first = report_history(sid, storage, NewHistory("ChooseWorst", [0, 1, 2], 1))
    report_history(sid, storage, NewHistory("ChooseWorst", [0, 2, 3], 3))
    remove_history(sid, storage, first)  # the person pressed Undo
    report_skip(sid, inner.trials[4]._trial_id, storage)
    attrs = preference.system_attrs(inner)
    assert preference.is_preferential(inner)
    assert sorted(preference.preferences(attrs)) == sorted(map(tuple, get_preferences(attrs)))
    assert sorted(preference.preferences(attrs)) == [(0, 3), (2, 3)]
    assert preference.skipped_ids(attrs) == set(get_skipped_trial_ids(attrs))
    # on the page: not chosen worst, not skipped (trial 1's choice was undone); RUNNING counts
    assert preference.active(inner) == 3
    counts = preference.tally(inner)  # the choices made trials 0 … 3 COMPLETE
    assert counts == {0: (1, 0, False), 1: (0, 0, False), 2: (1, 0, False), 3: (0, 2, False)}
    # never chosen worst first, then most wins, then the earlier trial
    assert [t.number for t in preference.ranked(inner)] == [0, 2, 1, 3]
    assert [t.number for t in rf.ranked(inner)] == [0, 2, 1, 3]  # the one rule follows it


# ---------------------------------------------------------------------------- mixed


def test_mixed_study_shows_the_scorers_best_of_each_round(tiny_sd1, clip_files, tmp_path):
    cfg = config(tiny_sd1, clip_files, tmp_path, "mixed", objective="mixed", trials=6,
                 preference={"candidates": 2, "pool": 3})
    study, ctx = prepare(cfg, log=lambda m: None)
    optimize(study, ctx, log=lambda m: None)
    done = sorted(rf.completed(study), key=lambda t: t.number)
    assert len(done) == 6 and study.metric_names == ["your choice (values unused)"]
    attrs = preference.system_attrs(study)
    skipped = preference.skipped_ids(attrs)
    for start in (0, 3):
        round_ = done[start:start + 3]
        scores = [t.user_attrs[rf.ATTR_SCORE] for t in round_]
        best = round_[int(np.argmax(scores))]  # the first of equal scores
        assert best.user_attrs[preference.ATTR_CANDIDATE] == best.user_attrs[rf.ARTIFACT_PROBES]
        others = [t for t in round_ if t.number != best.number]
        assert best._trial_id not in skipped
        assert all(t._trial_id in skipped for t in others)
        assert {(best.number, t.number) for t in others} <= set(preference.preferences(attrs))
    assert preference.active(study) == 2
    # every trial's note says how to export it, and that command works as written
    from optuna_dashboard._note import get_note_from_system_attrs

    note = get_note_from_system_attrs(attrs, done[0]._trial_id)["body"]
    command = next(line.strip() for line in note.splitlines() if "mergesearch export" in line)
    assert command.endswith(f"--trial {done[0].number} --to checkpoint --to comfyui")
    args = shlex.split(command)[1:]
    proc = subprocess.run([sys.executable, "-m", "search.cli", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (ctx.run.exports / f"mixed-trial{done[0].number}.safetensors").is_file()


# ---------------------------------------------------------------------------- steering


class _Person(threading.Thread):
    """Prefers merges with less of model1 in the input blocks: whenever the page is full, picks
    the candidate with the highest `input` ratio as the worst, as the page's click does."""

    def __init__(self, study: optuna.Study, candidates: int):
        super().__init__(daemon=True)
        self.study, self.candidates, self.stop = study, candidates, threading.Event()

    def run(self) -> None:
        from optuna_dashboard._preferential_history import NewHistory, report_history

        while not self.stop.is_set():
            attrs = preference.system_attrs(self.study)
            worse = {w for _, w in preference.preferences(attrs)}
            shown = [t for t in self.study.get_trials(deepcopy=False, states=(
                TrialState.COMPLETE,)) if preference.ATTR_CANDIDATE in t.user_attrs
                and t.number not in worse]
            if len(shown) >= self.candidates:
                worst = max(shown, key=lambda t: t.params["input"])
                report_history(self.study._study_id, self.study._storage, NewHistory(
                    "ChooseWorst", [t.number for t in shown], worst.number))
            time.sleep(0.05)


def test_choices_steer_the_proposals_and_survive_a_resume(tiny_sd1, clip_files, tmp_path):
    cfg = config(tiny_sd1, clip_files, tmp_path, "steer", scorers=[], trials=7,
                 preference={"candidates": 2}, sampler={"seed": 1})
    study, ctx = prepare(cfg, log=lambda m: None)
    person = _Person(study, 2)
    person.start()
    try:
        optimize(study, ctx, log=lambda m: None, poll_seconds=0.05)
        # a second start (a resume) goes on from the stored choices
        study, ctx = prepare(cfg, log=lambda m: None)
        person.study = study
        optimize(study, ctx, trials=14, log=lambda m: None, poll_seconds=0.05)
    finally:
        person.stop.set()
        person.join()
    trials = sorted(rf.completed(study), key=lambda t: t.number)
    assert len(trials) == 14 and len(preference.preferences(preference.system_attrs(study))) >= 10
    first, last = [t.params["input"] for t in trials[:2]], [t.params["input"] for t in trials[-5:]]
    # the first two are random draws (no choice yet); later ones follow the person's taste
    assert np.mean(last) < 0.3 and np.mean(last) < np.mean(first)
    favourite = rf.best_trial(study)
    assert favourite.params["input"] <= min(t.params["input"] for t in trials[:7])


# ---------------------------------------------------------------------------- pictures


def test_labelled_grid_places_every_image_under_its_seed_and_beside_its_prompt():
    g = torch.Generator().manual_seed(0)
    images = ProbeImages(images=torch.rand(4, 3, 64, 64, generator=g), prompts=["a", "a", "b", "b"],
                         seeds=[7, 9, 7, 9], prompt_index=[0, 0, 1, 1],
                         weights=torch.ones(4))
    grid = np.asarray(labelled_grid(images, "trial 3"))
    factor = MIN_CELL // 64
    assert grid.shape == (_HEADER_H + 2 * MIN_CELL, _LABEL_W + 2 * MIN_CELL, 3)
    for i, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expected = (images.images[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        expected = expected.repeat(factor, axis=0).repeat(factor, axis=1)  # nearest, by hand
        y, x = _HEADER_H + row * MIN_CELL, _LABEL_W + col * MIN_CELL
        assert np.array_equal(grid[y:y + MIN_CELL, x:x + MIN_CELL], expected)
    for row in range(2):  # each prompt's label is drawn (dark pixels) in its row
        y = _HEADER_H + row * MIN_CELL
        assert (grid[y:y + 20, 4:_LABEL_W - 4] < 100).any()
    for col in range(2):  # each seed's label above its column
        x = _LABEL_W + col * MIN_CELL
        assert (grid[:_HEADER_H, x:x + MIN_CELL] < 100).any()


def test_ratio_chart_labels_its_axis_and_tells_searched_tied_and_fixed_apart(tiny_sd1):
    ratios = {n: 0.5 for n in ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00",
                                *(f"OUT{i:02d}" for i in range(12)))}
    ratios.update(IN00=0.2, IN01=0.2, OUT11=0.9, BASE=1.0)
    recipe = Recipe(arch="sd1", method="weighted_sum", vocabulary="mbw", ratios=ratios,
                    models={"model1": Source(str(tiny_sd1.a)), "model2": Source(str(tiny_sd1.b))})
    roles = {n: "fixed" for n in ratios}
    roles.update(IN00="tied:IN00+IN01", IN01="tied:IN00+IN01", OUT11="searched")
    svg = ratio_chart_svg(recipe, roles)
    for tick in ("0", "0.25", "0.5", "0.75", "1"):
        assert f'text-anchor="end">{tick}</text>' in svg
    colours = re.findall(r'fill="([^"]+)" stroke="#555" stroke-width="0.3"><title>'
                         r'([^:]+):', svg)
    fill_of = {block: fill for fill, block in colours}
    assert fill_of["IN00"] == fill_of["IN01"] != fill_of["OUT11"]
    assert fill_of["M00"] == "url(#fixed)" and fill_of["OUT11"] == "#4e79a7"
    assert "tied: IN00+IN01" in svg and "searched" in svg and "fixed" in svg
    assert ">0.20</text>" in svg and ">0.90</text>" in svg  # each bar's value written on it
