"""Studies end to end on the tiny family: SQLite storage, artifacts, resume, failures, seeds."""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from evaluators import register_scorer
from evaluators.sanity import SanityConfig
from evaluators.testing import write_tiny_open_clip
from search import run_folder as rf
from search.config import ConfigError, parse_config
from search.study import optimize, prepare


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("clip"), name="study-clip", seed=0)


def study_config(fam, clip_files, tmp_path, name="s", **over):
    data = {
        "name": name,
        "models": {"model1": str(fam.a), "model2": str(fam.b)},
        "config_folder": str(fam.config_folder),
        "merge": {"vocabulary": "blocks", "arithmetic": "fast"},
        "probes": {"prompts": ["a red apple"], "seeds": [1, 2], "steps": 2, "cfg": 4.0,
                   "width": 64, "height": 64},
        "scorers": [{"kind": "clip", "model": str(clip_files[0]), "weights": str(clip_files[1])},
                    {"kind": "sanity"}],
        "sampler": {"name": "tpe", "seed": 3},
        "warm_start": {"model1": True, "model2": False, "uniform": []},
        "trials": 4,
        "output": str(tmp_path / "runs"),
        "device": "cpu",
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data)


def run(cfg, trials=None):
    study, ctx = prepare(cfg, log=lambda m: None)
    optimize(study, ctx, trials=trials, log=lambda m: None)
    return study, ctx


def test_study_records_scores_timings_and_images(tiny_sd1, clip_files, tmp_path):
    cfg = study_config(tiny_sd1, clip_files, tmp_path)
    study, ctx = run(cfg)
    done = rf.completed(study)
    assert len(done) == 4
    assert done[0].user_attrs["warm_start"] == "model1"
    assert done[0].params == {"input": 1.0, "middle": 1.0, "out": 1.0}
    assert study.metric_names == ["clip"]  # the dashboard names the objective (sanity: penalty)
    for t in done:
        assert set(t.user_attrs[rf.ATTR_SCORES]) == {"clip", "sanity"}
        assert set(t.user_attrs[rf.ATTR_TIMINGS]) >= {"apply", "generate", "score", "bookkeeping"}
        recipe = rf.trial_recipe(t)
        assert recipe.ratios["middle"] == pytest.approx(t.params["middle"])
        probes = ctx.run.artifact_dir / t.user_attrs[rf.ARTIFACT_PROBES]
        assert probes.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        chart = ctx.run.artifact_dir / t.user_attrs[rf.ARTIFACT_RATIOS]
        assert chart.read_bytes().startswith(b"<svg xmlns")
        # optuna's own listing: the probe grid first (what the dashboard's gallery shows)
        stored = [m.artifact_id for m in optuna.artifacts.get_all_artifact_meta(
            t, storage=study._storage)]
        assert stored == [t.user_attrs[rf.ARTIFACT_PROBES], t.user_attrs[rf.ARTIFACT_RATIOS]]
    folder = rf.RunFolder.load(cfg.run_folder)
    assert folder.study().study_name == "s" and folder.config_path.exists()


class _Interrupt:
    def __init__(self, after):
        self.after = after

    def __call__(self, study, trial):
        if len(rf.completed(study)) >= self.after:
            raise KeyboardInterrupt


def test_resume_keeps_completed_trials(tiny_sd1, clip_files, tmp_path):
    cfg = study_config(tiny_sd1, clip_files, tmp_path, trials=5)
    study, ctx = prepare(cfg, log=lambda m: None)
    optimize(study, ctx, callbacks=[_Interrupt(2)], log=lambda m: None)  # "Ctrl-C" after 2
    first = {t.number: (t.params, t.value) for t in rf.completed(study)}
    assert len(first) == 2
    study, _ = run(cfg)  # the same command again resumes
    done = {t.number: (t.params, t.value) for t in rf.completed(study)}
    assert len(done) == 5
    assert all(done[n] == first[n] for n in first)


def test_a_moved_run_folders_config_resumes_the_moved_folder(tiny_sd1, clip_files, tmp_path,
                                                              capsys):
    """`mergesearch run RUN/config.yaml` on a run folder that was moved resumes that folder: its
    config.yaml still names the old place as `output`, which must not get a new, empty study."""
    import shutil

    from search.cli import main

    cfg = study_config(tiny_sd1, clip_files, tmp_path / "first", trials=2)
    study, _ = run(cfg)
    first = {t.number: t.params for t in rf.completed(study)}
    moved = tmp_path / "elsewhere" / cfg.name
    moved.parent.mkdir()
    shutil.move(cfg.run_folder, moved)
    assert main(["run", str(moved / "config.yaml"), "--trials", "3"]) == 0
    assert not cfg.run_folder.exists()  # nothing written at the old place
    done = {t.number: t.params for t in rf.completed(rf.RunFolder.load(moved).study())}
    assert len(done) == 3 and all(done[n] == first[n] for n in first)
    # its config.yaml now names where it is
    assert yaml.safe_load((moved / "config.yaml").read_text())["output"] == str(moved.parent)
    # renamed as well: the study's name no longer names the folder, so it is refused, not
    # started afresh beside it
    renamed = tmp_path / "elsewhere" / "renamed"
    shutil.move(moved, renamed)
    capsys.readouterr()
    assert main(["run", str(renamed / "config.yaml")]) == 1
    err = capsys.readouterr().err
    assert str(renamed / "config.yaml") in err and "'s'" in err and "renamed" in err, err
    assert sorted(p.name for p in renamed.parent.iterdir()) == ["renamed"]


def test_sources_are_hashed_once_recorded_and_checked_by_every_worker(tiny_sd1, clip_files,
                                                                      tmp_path):
    import shutil

    from merge_backend.hashing import sha256_of
    from search.study import STUDY_ATTR_SOURCES

    model2 = tmp_path / "model2.safetensors"
    shutil.copyfile(tiny_sd1.b, model2)
    cfg = study_config(tiny_sd1, clip_files, tmp_path, trials=2,
                       models={"model1": str(tiny_sd1.a), "model2": str(model2)})
    study, _ = run(cfg)
    digests = {"model1": sha256_of(tiny_sd1.a), "model2": sha256_of(model2)}
    assert study.user_attrs[STUDY_ATTR_SOURCES] == digests
    for t in rf.completed(study):  # an export can tell whether a source changed since
        assert {r: s.sha256 for r, s in rf.trial_recipe(t).models.items()} == digests
    data = bytearray(model2.read_bytes())
    data[-1] ^= 1  # one bit of one weight: another file to this study
    model2.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"model2\.safetensors \(model2\): its sha256"):
        prepare(study_config(tiny_sd1, clip_files, tmp_path, trials=3,
                             models={"model1": str(tiny_sd1.a), "model2": str(model2)}),
                log=lambda m: None)
    assert len(rf.completed(rf.RunFolder.load(cfg.run_folder).study())) == 2


def register_raising_scorer(kind: str, call: int, error: BaseException) -> None:
    """A scorer ``kind`` that scores 0 and raises ``error`` on its ``call``-th call."""
    calls = {"n": 0}

    class Raising:
        name = kind

        def score(self, images, prompts):
            calls["n"] += 1
            if calls["n"] == call:
                raise error
            return torch.zeros(images.shape[0])

    config = type(f"{kind}Config", (SanityConfig,), {"__annotations__": {"kind": str},
                                                     "kind": kind})
    register_scorer(kind, config, lambda c, d, t: Raising())


def test_failing_trial_is_recorded_and_study_completes(tiny_sd1, clip_files, tmp_path):
    register_raising_scorer("flaky", 2, RuntimeError("CUDA out of memory (simulated by a "
                                                     "flaky scorer)"))
    cfg = study_config(tiny_sd1, clip_files, tmp_path, scorers=[{"kind": "flaky"}])
    study, _ = run(cfg)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and "out of memory" in failed[0].user_attrs[rf.ATTR_FAIL]
    assert len(rf.completed(study)) == 4  # the budget counts COMPLETE trials: one more ran
    assert len(study.trials) == 5


def test_ctrl_c_in_a_trial_records_it_interrupted_and_hands_back_the_next(tiny_sd1,
                                                                           clip_files, tmp_path):
    """Ctrl-C lands inside the third trial's scoring (a scorer raising KeyboardInterrupt: the
    signal tests in test_crash_study cannot always land inside a trial on a loaded machine):
    the trial is FAIL `interrupted` (costing none of the budget), the trial proposed ahead goes
    back to the queue unstarted, and the worker's result says it was interrupted (what
    makes `mergesearch run` exit 130)."""
    register_raising_scorer("ctrl_c", 3, KeyboardInterrupt())
    cfg = study_config(tiny_sd1, clip_files, tmp_path, scorers=[{"kind": "ctrl_c"}])
    study, ctx = prepare(cfg, log=lambda m: None)
    assert optimize(study, ctx, log=lambda m: None).interrupted
    study = rf.RunFolder.load(cfg.run_folder).study()
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    assert optuna.trial.TrialState.RUNNING not in states
    (failed,) = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed.number == 2 and failed.user_attrs[rf.ATTR_FAIL] == "interrupted"
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(waiting) == 1 and not waiting[0].params  # nothing stored ahead of its draw


def test_same_config_and_seed_same_sequence(tiny_sd1, clip_files, tmp_path):
    runs = []
    for name in ("first", "second"):
        study, _ = run(study_config(tiny_sd1, clip_files, tmp_path / name, name="same"))
        runs.append([(t.params, t.value) for t in study.trials])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("change,message", [
    ({"trials": 0}, "trials"),
    ({"merge": {"vocabulary": "nope"}}, "merge.vocabulary"),
    ({"merge": {"bounds": [0.2, 1.5]}}, "allow_extrapolation"),
    ({"merge": {"method": "add_difference"}}, "models.base"),
    ({"sampler": {"name": "annealing"}}, "sampler.name"),
    ({"probes": {"width": 65}}, "probes.width"),
    ({"models": {"model2": "/nonexistent.safetensors"}}, "models.model2"),
    ({"scorers": [{"kind": "clip", "model": "ViT-B-32", "weights": "/missing.pt"}]}, "/missing.pt"),
    ({"name": "has space"}, "name"),
    ({"objective": "multi", "sampler": {"name": "cmaes"}}, "single-objective"),
    ({"sampler": {"seed": -1}}, "sampler.seed"),
    ({"sampler": {"seed": 2**32}}, "sampler.seed"),
    ({"warm_start": {"uniform": [0.5, float("nan")]}}, "warm_start.uniform[1]"),
    ({"warm_start": {"uniform": [1.5]}}, "warm_start.uniform[0]"),
    ({"merge": {"bounds": [0.2, 0.8]}, "warm_start": {"uniform": [0.1]}}, "warm_start.uniform[0]"),
    ({"warm_start": {"presets": {"p": {"IN01": float("inf")}}}}, "warm_start.presets.p.IN01"),
    ({"merge": {"fixed": {"IN01": float("nan")}}}, "merge.fixed.IN01"),
    ({"merge": {"fixed": {"IN01": 3.0}}}, "merge.fixed.IN01"),
    ({"merge": {"multiplier": float("nan")}}, "merge.multiplier"),
    ({"merge": {"bounds": [0.0, float("inf")], "allow_extrapolation": True}}, "merge.bounds"),
    ({"probes": {"cfg": float("inf")}}, "probes.cfg: Input should be a finite number"),
    ({"probes": {"cfg": float("nan")}}, "probes.cfg: Input should be a finite number"),
    ({"probes": {"prompts": [{"text": "a red apple", "weight": float("inf")}]}},
     "probes.prompts[0].weight: Input should be a finite number"),
    ({"scorers": [{"kind": "sanity", "weight": float("inf")}]}, "scorers[0].weight"),
    ({"scorers": [{"kind": "sanity", "range": [0.0, float("nan")]}]}, "scorers[0].range"),
    ({"scorers": [{"kind": "sanity", "penalties": {"black": float("inf")}}]},
     "scorers[0].penalties.black"),
])
def test_each_invalid_field_has_its_own_message(tiny_sd1, clip_files, tmp_path, change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        study_config(tiny_sd1, clip_files, tmp_path, **change)


def test_unknown_block_names_fail_before_loading(tiny_sd1, clip_files, tmp_path):
    cfg = study_config(tiny_sd1, clip_files, tmp_path, merge={"vocabulary": "mbw",
                                                             "fixed": {"IN42": 0.5}})
    with pytest.raises(ConfigError, match="merge.fixed.IN42"):
        prepare(cfg)
    assert not (tmp_path / "runs").exists()  # nothing created before the checks passed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_trial_image(tiny_sd1, clip_files, tmp_path):
    cfg = study_config(tiny_sd1, clip_files, tmp_path, trials=1)
    study, ctx = run(cfg)
    trial = rf.completed(study)[0]
    artifact = trial.user_attrs[rf.ARTIFACT_PROBES]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "dashboard", str(cfg.run_folder),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/artifacts/{study._study_id}/{trial._trial_id}/{artifact}"
        body = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = response.read()
                break
            except OSError:
                time.sleep(0.25)
        assert body == (ctx.run.artifact_dir / artifact).read_bytes()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
            assert "s" in json.dumps(json.loads(r.read()))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_lora_strength_is_searched_alongside_ratios(tiny_sd1, clip_files, tmp_path):
    from merge_backend import open_checkpoint
    from merge_backend.lora import random_lora, save_lora

    lora = random_lora(open_checkpoint(tiny_sd1.base), rank=4, seed=5, scale=0.2)
    path = save_lora(lora, tmp_path / "style.safetensors")
    cfg = study_config(tiny_sd1, clip_files, tmp_path, trials=3, merge={
        "vocabulary": "blocks", "arithmetic": "fast",
        "loras": [{"path": str(path), "strength": {"low": 0.0, "high": 1.0}, "blocks": ["out"]}]})
    study, _ = run(cfg)
    done = rf.completed(study)
    assert {"lora0", "lora0:out"} <= set(done[-1].params)
    for t in done:
        spec = rf.trial_recipe(t).loras[0]
        assert spec.strength == pytest.approx(t.params["lora0"])
        assert spec.block_strengths == {"out": pytest.approx(t.params["lora0:out"])}
    values = {t.value for t in done}
    assert len(values) == len(done)  # different strengths, different images


def test_validate_command_prints_resolved_config(tiny_sd1, clip_files, tmp_path, capsys):
    import yaml as _yaml

    from search.cli import main

    cfg = study_config(tiny_sd1, clip_files, tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(_yaml.safe_dump(json.loads(cfg.model_dump_json())))
    assert main(["validate", str(path)]) == 0
    out = _yaml.safe_load(capsys.readouterr().out)
    assert out["searched_parameters"] == {"input": [0.0, 1.0], "middle": [0.0, 1.0],
                                          "out": [0.0, 1.0]}


@pytest.mark.parametrize("sampler", ["cmaes", "gp", "qmc", "random"])
def test_every_sampler_runs(tiny_sd1, clip_files, tmp_path, sampler):
    cfg = study_config(tiny_sd1, clip_files, tmp_path, trials=3, sampler={"name": sampler})
    study, _ = run(cfg)
    assert len(rf.completed(study)) == 3
    assert type(study.sampler.inner).__name__.lower().startswith(sampler[:2])


def test_multi_objective_study_has_a_pareto_front(tiny_sd1, clip_files, tmp_path):
    scorers = [{"kind": "clip", "name": "clip_a", "model": str(clip_files[0]),
                "weights": str(clip_files[1])},
               {"kind": "reference", "name": "look", "model": str(clip_files[0]),
                "weights": str(clip_files[1]), "references": None},
               {"kind": "sanity"}]
    cfg = study_config(tiny_sd1, clip_files, tmp_path, trials=4, objective="multi",
                       scorers=scorers, sampler={"name": "nsga2"})
    study, ctx = prepare(cfg, log=lambda m: None)
    ctx.scorers[1].set_references(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    optimize(study, ctx, log=lambda m: None)
    assert len(study.directions) == 2  # one per objective scorer; sanity is a penalty
    assert all(len(t.values) == 2 for t in rf.completed(study))
    assert 1 <= len(study.best_trials) <= 4
    assert rf.pick_trials(study, pareto=2)


def test_a_copied_run_folders_dashboard_notes_name_the_copy(tiny_sd1, clip_files, tmp_path):
    """Each trial's note holds its export and compare commands; served from a copy of the run
    folder (here read-only, under a name with a space and a quote) they name the copy, and
    serving writes nothing."""
    import shlex
    import shutil
    import stat

    from search.dashboard import DashboardServer

    cfg = study_config(tiny_sd1, clip_files, tmp_path, trials=2)
    run(cfg)
    copy = Path(shutil.copytree(cfg.run_folder, tmp_path / "elsewhere" / "it's a copy"))
    shutil.rmtree(cfg.run_folder)  # the folder the trials ran in is gone
    files = [p for p in copy.rglob("*") if p.is_file()]
    before = {p: p.read_bytes() for p in files}
    for p in [*files, copy]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    server = DashboardServer("127.0.0.1", 0)
    try:
        server.start(rf.RunFolder.load(copy))
        with urllib.request.urlopen(f"{server.url.removesuffix('/dashboard')}/api/studies/1",
                                    timeout=10) as response:
            trials = json.loads(response.read())["trials"]
    finally:
        server.stop()
        for p in [*files, copy]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert len(trials) == 2
    quoted = shlex.quote(str(copy))
    for trial in trials:
        body = trial["note"]["body"]
        n = trial["number"]
        assert f"mergesearch export {quoted} --trial {n} --to checkpoint --to comfyui" in body
        assert f"mergesearch compare {quoted} --trials {n}" in body
        assert str(cfg.run_folder) not in body
    assert {p: p.read_bytes() for p in files} == before
