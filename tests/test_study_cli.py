"""The study side of the CLI: fresh points per trial, one tie rule, stale trials, portable run
folders, progress lines and every option's default in --help."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from safetensors import safe_open

from evaluators.testing import write_tiny_open_clip
from search import run_folder as rf
from search.cli import build_parser, main
from search.liveness import ATTR_BOOT, BOOT_ID
from search.samplers import make_sampler
from search.trial import ATTR_DUPLICATE

SPACE = {n: FloatDistribution(0.0, 1.0) for n in ("input", "middle", "out")}


def params_of(study):
    return [tuple(sorted(t.params.items())) for t in study.trials if t.params]


def drive(study, n):
    """n trials of a cheap objective through ask / tell, as a worker does."""
    for _ in range(n):
        trial = study.ask(SPACE)
        study.tell(trial, sum((v - 0.3) ** 2 for v in trial.params.values()))


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "gp", "nsga2", "qmc"])
def test_each_start_draws_new_points_and_one_worker_is_reproducible(name):
    """Each process builds its sampler from the same seed; a resumed run (a new sampler on the
    same study) must not replay the first run's points, and one uninterrupted run twice with the
    same seed gives the same points."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, sampler=make_sampler(name, 7, {}))
    drive(study, 6)
    resumed = optuna.load_study(study_name=study.study_name, storage=storage,
                                sampler=make_sampler(name, 7, {}))
    drive(resumed, 6)
    points = params_of(resumed)
    assert len(points) == 12 and len(set(points)) == 12
    again = optuna.create_study(sampler=make_sampler(name, 7, {}))
    drive(again, 6)
    assert params_of(again) == points[:6]


# ---------------------------------------------------------------------------- one tie rule


@pytest.fixture
def tied_run(tmp_path):
    """A run folder whose trials 1, 3 and 4 share the best value."""
    run = rf.RunFolder(tmp_path / "tied", "tied", rf.default_storage(tmp_path / "tied"))
    run.save()
    study = optuna.create_study(study_name="tied", storage=run.storage, direction="maximize")
    for number, value in enumerate([0.1, 0.9, 0.5, 0.9, 0.9, 0.2]):
        study.add_trial(optuna.trial.create_trial(
            params={"x": number / 10}, distributions={"x": FloatDistribution(0, 1)},
            value=value, user_attrs={rf.ATTR_SCORES: {"clip": value}}))
    return run


def test_best_status_and_export_pick_the_same_trial_among_equals(tied_run, capsys):
    assert main(["best", str(tied_run.path), "--top", "4"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [int(r.split()[0]) for r in rows] == [1, 3, 4, 2]  # equal values: earlier first
    assert main(["status", str(tied_run.path)]) == 0
    assert "best: trial 1, value 0.9" in capsys.readouterr().out
    study = tied_run.study()
    assert [t.number for t in rf.pick_trials(study, best=True)] == [1]


# ---------------------------------------------------------------------------- stale trials


def _running_trial(run: rf.RunFolder, worker: str, boot: str | None):
    study = optuna.create_study(study_name=run.study_name, storage=rf.open_storage(
        run.storage, run.heartbeat_seconds, run.grace_seconds), load_if_exists=True)
    trial = study.ask({"x": FloatDistribution(0, 1)})
    trial.set_user_attr(rf.ATTR_WORKER, worker)
    if boot:
        trial.set_user_attr(ATTR_BOOT, boot)
    study._storage.record_heartbeat(trial._trial_id)
    return study, trial


def test_status_shows_and_fails_a_trial_whose_heartbeat_stopped(tmp_path, capsys):
    run = rf.RunFolder(tmp_path / "r", "r", rf.default_storage(tmp_path / "r"), 1, 2)
    run.save()
    study, trial = _running_trial(run, "another-machine:4242", None)
    assert main(["status", str(run.path)]) == 0
    assert f"trial {trial.number}: running; on another-machine:4242" in capsys.readouterr().out
    time.sleep(3.2)  # past grace_seconds without a heartbeat
    assert main(["status", str(run.path)]) == 0
    assert f"trial {trial.number}: STALE" in capsys.readouterr().out
    assert main(["status", str(run.path), "--fail-stale"]) == 0
    out = capsys.readouterr().out
    assert f"marked FAIL: trial {trial.number}" in out and "1 fail" in out
    failed = run.study().trials[trial.number]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs[rf.ATTR_FAIL].startswith("stale")


def _run_with_a_dead_workers_trial(tmp_path: Path):
    """A new run folder holding one RUNNING trial of a worker of this machine that has ended."""
    run = rf.RunFolder(tmp_path / "r", "r", rf.default_storage(tmp_path / "r"))
    run.save()
    gone = subprocess.Popen(["true"])
    gone.wait()
    return run, _running_trial(run, f"{socket.gethostname()}:{gone.pid}", BOOT_ID)[1]


@pytest.mark.skipif(not BOOT_ID, reason="needs a boot id (Linux)")
def test_a_dead_local_worker_is_stale_at_once(tmp_path, capsys):
    run, trial = _run_with_a_dead_workers_trial(tmp_path)
    _, alive = _running_trial(run, f"{socket.gethostname()}:{os.getpid()}", BOOT_ID)
    assert main(["status", str(run.path), "--fail-stale"]) == 0
    out = capsys.readouterr().out
    assert f"marked FAIL: trial {trial.number}" in out
    assert f"trial {alive.number}: running" in out


@pytest.mark.skipif(not BOOT_ID, reason="needs a boot id (Linux)")
def test_a_killed_worker_its_parent_has_not_reaped_is_stale_at_once(tmp_path, capsys):
    """A worker killed under a parent that has not waited for it yet (a zombie) still answers
    signal 0: it was taken as alive until grace_seconds passed (76 s in a sweep)."""
    run = rf.RunFolder(tmp_path / "r", "r", rf.default_storage(tmp_path / "r"))
    run.save()
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        os.kill(zombie.pid, 0)  # the PID still exists: only its state tells
        _, trial = _running_trial(run, f"{socket.gethostname()}:{zombie.pid}", BOOT_ID)
        assert main(["status", str(run.path), "--fail-stale"]) == 0
        assert f"marked FAIL: trial {trial.number}" in capsys.readouterr().out
    finally:
        zombie.wait()


@pytest.mark.skipif(not BOOT_ID, reason="needs a boot id (Linux)")
def test_fail_stale_on_a_database_it_cannot_write_says_why_in_one_line(tmp_path, capsys):
    run, trial = _run_with_a_dead_workers_trial(tmp_path)
    # another process holds the write lock (a read-only folder fails the same write the same way)
    holder = sqlite3.connect(rf.sqlite_file(run.storage), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert main(["status", str(run.path), "--fail-stale"]) == 1
    finally:
        holder.rollback()
        holder.close()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"mergesearch: error: {rf.sqlite_file(run.storage)}: cannot mark "
                          f"trial {trial.number} FAIL")
    assert "database is locked" in err
    assert run.study().trials[trial.number].state == optuna.trial.TrialState.RUNNING


# ---------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("clip"), name="cli-clip", seed=0)


@pytest.fixture(scope="module")
def study_dir(tiny_sd1, clip, tmp_path_factory):
    """A config with paths relative to its own folder, run from another working directory."""
    root = tmp_path_factory.mktemp("portable")
    (root / "models").mkdir()
    for src, name in ((tiny_sd1.a, "a"), (tiny_sd1.b, "b")):
        os.link(src, root / "models" / f"{name}.safetensors")
    (root / "study").mkdir()
    config = {
        "name": "port", "models": {"model1": "../models/a.safetensors",
                                   "model2": "../models/b.safetensors"},
        "config_folder": str(tiny_sd1.config_folder), "merge": {"vocabulary": "blocks"},
        "probes": {"prompts": ["a red apple"], "seeds": [1], "steps": 2, "width": 64,
                   "height": 64},
        "scorers": [{"kind": "clip", "model": str(clip[0]), "weights": str(clip[1])}],
        "warm_start": {"model1": True, "model2": False, "uniform": []},
        "trials": 3, "output": "../runs", "device": "cpu",
    }
    (root / "study" / "c.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def ran(study_dir):
    """`mergesearch run study/c.yaml` started in the folder above the config."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(study_dir)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            status = main(["run", "study/c.yaml"])
    finally:
        os.chdir(here)
    assert status == 0, err.getvalue()
    return study_dir / "runs" / "port", out.getvalue(), err.getvalue()


def test_progress_is_one_line_per_trial_with_an_eta_and_a_labelled_best(ran):
    run, out, err = ran
    lines = [line for line in err.splitlines() if " complete | trial " in line]
    assert len(lines) == 3 and "\r" not in err
    assert "Trial 0 finished" not in err and "A new study created" not in err  # Optuna's own
    for n, line in enumerate(lines, 1):
        assert re.match(rf"\[[#.]+\] {n}/3 complete \| trial {n - 1}: score -?[\d.]+ \(", line)
        assert re.search(r"\| best: trial \d+, score -?[\d.]+, input=", line)
        assert re.search(r"elapsed, ETA (\d+ s|done)$", line)
    # a trial's seconds are its own phases' (proposed ahead, it was asked for while the one
    # before it drew: start to completion counts that wait too)
    trials = rf.RunFolder.load(run).study().trials
    for n, line in enumerate(lines):
        shown = float(re.search(r"\(([\d.]+) s\)", line)[1])
        assert shown == round(sum(trials[n].user_attrs[rf.ATTR_TIMINGS].values()), 1), line
    phases = ["checking the config", "loading a.safetensors into a pipeline", "loading scorer",
              "opening study 'port'", "ready in"]
    assert all(any(p in line for line in err.splitlines()) for p in phases), err


def test_run_folder_stores_absolute_paths_and_next_commands_name_it(ran, study_dir):
    run, out, _ = ran
    assert f"mergesearch export {run} --best" in out
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["models"]["model1"] == str(study_dir / "models" / "a.safetensors")
    recipe = rf.trial_recipe(rf.completed(rf.RunFolder.load(run).study())[0])
    assert {s.path for s in recipe.models.values()} == {
        str(study_dir / "models" / f"{n}.safetensors") for n in "ab"}


def test_export_works_from_any_directory(ran, tmp_path, monkeypatch, capsys):
    run, _, _ = ran
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "--best", "--to", "mbw", "-o", "best.mbw.txt"]) == 0
    assert (tmp_path / "best.mbw.txt").read_text().count(",") > 10


def test_export_lora_on_a_fresh_run_and_to_a_file_name(ran, tiny_sd1, tmp_path, capsys):
    run, _, _ = ran
    assert not (run / "exports").exists()
    base = ["export", str(run), "--best", "--to", "lora", "--base", str(tiny_sd1.base),
            "--rank", "4", "--quiet"]
    assert main(base) == 0, capsys.readouterr().err
    written = json.loads(capsys.readouterr().out)["written"]
    assert len(written) == 1 and Path(written[0]).parent == run / "exports"
    assert main([*base, "-o", str(tmp_path / "best.lora.safetensors")]) == 0
    with safe_open(tmp_path / "best.lora.safetensors", "pt") as f:
        assert any(k.endswith(".lora_down.weight") for k in f.keys())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.lora.safetensors"]
    assert not [p for p in (run / "exports").iterdir() if p.name.startswith(".")]


def test_a_run_folder_with_relative_paths_from_an_older_version_still_exports(
        ran, study_dir, tmp_path, monkeypatch, capsys):
    """Older runs stored paths relative to where `run` started (study/../models/a...)."""
    run, _, _ = ran
    legacy = study_dir / "runs" / "legacy"
    legacy.mkdir()
    trial = rf.completed(rf.RunFolder.load(run).study())[0]
    recipe = dict(trial.user_attrs[rf.ATTR_RECIPE])
    recipe["models"] = {role: {**src, "path": os.path.relpath(src["path"], study_dir)
                               .replace("models", "study/../models")}
                        for role, src in recipe["models"].items()}
    legacy_run = rf.RunFolder(legacy, "legacy", rf.default_storage(legacy))
    legacy_run.save()
    study = optuna.create_study(study_name="legacy", storage=legacy_run.storage,
                                direction="maximize")
    study.add_trial(optuna.trial.create_trial(params=trial.params,
                                              distributions=trial.distributions,
                                              value=trial.value,
                                              user_attrs={rf.ATTR_RECIPE: recipe}))
    (legacy / "config.yaml").write_text(yaml.safe_dump({"name": "legacy",
                                                        "output": "study/../runs"}))
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(legacy), "--best", "--to", "mbw", "-o", "x.mbw.txt"]) == 0, \
        capsys.readouterr().err


def test_a_point_already_scored_is_not_scored_again(ran, study_dir, capsys):
    """A proposal equal to a COMPLETE trial is recorded PRUNED (duplicate_of) and costs no
    budget; the next trial is a new point."""
    run, _, _ = ran
    study = rf.RunFolder.load(run).study()
    twin = rf.completed(study)[-1]
    study.enqueue_trial(twin.params)
    here = os.getcwd()
    os.chdir(study_dir)
    try:
        assert main(["run", "study/c.yaml", "--trials", "4"]) == 0
    finally:
        os.chdir(here)
    assert "skipped, same parameters as trial" in capsys.readouterr().err
    trials = rf.RunFolder.load(run).study().trials
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert [t.user_attrs[ATTR_DUPLICATE] for t in pruned] == [twin.number]
    assert len(rf.completed(rf.RunFolder.load(run).study())) == 4
    done = [tuple(sorted(t.params.items())) for t in rf.completed(rf.RunFolder.load(run).study())]
    assert len(set(done)) == 4


def test_a_warm_start_queued_twice_is_drawn_once(study_dir, tmp_path):
    """Two workers starting together can both queue the warm starts (measured: the PostgreSQL
    crash test drew model1 as trials 0 and 1 in 2 of 4 runs). Both copies are popped before
    either stores its parameters, as two workers pop them; the lowest-numbered copy is drawn,
    the other is a duplicate of it, and a run then draws the warm start once."""
    from search.config import parse_config
    from search.lane import Lane, propose_params
    from search.liveness import Heartbeat
    from search.study import optimize, prepare

    data = yaml.safe_load((study_dir / "study" / "c.yaml").read_text())
    data.update(name="twice", output=str(tmp_path / "runs"), trials=3,
                models={role: str((study_dir / "study" / path).resolve())
                        for role, path in data["models"].items()})
    study, ctx = prepare(parse_config(data), log=lambda m: None)
    queued = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs["warm_start"] for t in queued] == ["model1"]
    study.enqueue_trial(queued[0].params or queued[0].system_attrs["fixed_params"],
                        user_attrs={"warm_start": "model1"})  # what the second worker queues
    with Heartbeat(study) as heartbeat:
        lane = Lane(study, heartbeat)
        first = lane.propose(ctx, 10, propose_params)
        second = lane.propose(ctx, 10, propose_params)
        assert (first.trial.number, first.twin) == (0, None)
        assert (second.trial.number, second.twin) == (1, 0)
        lane.hand_back(first.trial)
        lane.hand_back(second.trial)
        lane.close()
    optimize(study, ctx, log=lambda m: None)
    trials = study.get_trials()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    ones = [t for t in done if set(t.params.values()) == {1.0}]
    assert len(ones) == 1  # model1 drawn once
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert [t.user_attrs[ATTR_DUPLICATE] for t in pruned] == [ones[0].number]


@pytest.mark.skipif(not BOOT_ID, reason="needs a boot id (Linux)")
def test_a_warm_start_left_by_a_killed_worker_runs_again(study_dir, tmp_path):
    """A worker killed while it held the model1 warm start leaves it RUNNING; the next worker
    fails it as stale and must queue it again (warm starts are queued once per study), so the
    resumed study still draws model1."""
    from search.config import parse_config
    from search.study import optimize, prepare

    data = yaml.safe_load((study_dir / "study" / "c.yaml").read_text())
    data.update(name="killed", output=str(tmp_path / "runs"), trials=3,
                models={role: str((study_dir / "study" / path).resolve())
                        for role, path in data["models"].items()})
    study, ctx = prepare(parse_config(data), log=lambda m: None)
    held = study.ask()  # what the killed worker had popped
    assert held.user_attrs["warm_start"] == "model1"
    gone = subprocess.Popen(["true"])
    gone.wait()
    held.set_user_attr(rf.ATTR_WORKER, f"{socket.gethostname()}:{gone.pid}")
    held.set_user_attr(ATTR_BOOT, BOOT_ID)
    optimize(study, ctx, log=lambda m: None)
    trials = study.get_trials()
    assert trials[held.number].state == optuna.trial.TrialState.FAIL
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    ones = [t for t in done if set(t.params.values()) == {1.0}]
    assert [t.user_attrs.get("warm_start") for t in ones] == ["model1"]


# ---------------------------------------------------------------------------- --help


def _parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_every_option_of_every_command_shows_its_default():
    commands = list(_parsers(build_parser()))
    assert len(commands) > 15
    for path, parser in commands:
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            help_text = re.sub(r"\s+", " ", action.help % vars(action) if action.help else "")
            assert re.search(r"default|required", help_text, re.I), (path, action.option_strings)
            assert action.option_strings[-1] in text


def test_an_abbreviated_option_is_refused_not_taken_for_a_longer_one(capsys):
    """`--ratios X` was taken as `--ratios-file X` (argparse completes unique prefixes)."""
    with pytest.raises(SystemExit) as stop:
        main(["merge", "layers", "a.safetensors", "b.safetensors", "--ratios", "r.yaml",
              "-o", "out.safetensors"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --ratios r.yaml" in capsys.readouterr().err
    for path, parser in _parsers(build_parser()):
        assert parser.allow_abbrev is False, path


@pytest.mark.parametrize("argv", [["tiny", "{dir}"], ["toyworld", "build", "{dir}"]])
@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(2**32)])
def test_a_seed_out_of_range_is_refused_before_anything_is_written(argv, seed, tmp_path,
                                                                   capsys):
    """`tiny DIR --seed 99999999999999999999` failed inside torch ('Overflow when unpacking
    long long') after it had written DIR/config. (`toyworld DIR` takes no seed at all:
    test_toyworld.py::test_build_options_without_build_are_refused_not_ignored.)"""
    folder = tmp_path / "out"
    assert main([a.format(dir=folder) for a in argv] + ["--seed", seed]) == 1
    assert capsys.readouterr().err.strip() == (
        f"mergesearch: error: --seed {seed}: give a seed from 0 to 4294967295")
    assert not folder.exists()


def test_export_help_lists_every_format_without_internal_modules(capsys):
    from merge_backend.export import FORMATS

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert all(re.search(rf"^  {fmt}\s", text, re.M) for fmt in FORMATS)
    assert "lora" in FORMATS and "merge_backend" not in text and "jobs" not in text


def test_an_error_after_a_progress_line_starts_on_a_line_of_its_own(monkeypatch, capsys):
    """Commands draw `\\r` progress lines without a newline; the error must not join them."""
    import search.cli_tiny

    def half_done(args):
        print("\r  merging 3/964 tensors", end="", file=sys.stderr, flush=True)
        raise ValueError("/x/model.safetensors: key k: truncated")

    monkeypatch.setattr(search.cli_tiny, "run_tiny", half_done)
    assert main(["tiny", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert err.endswith("tensors\nmergesearch: error: /x/model.safetensors: key k: truncated\n")
