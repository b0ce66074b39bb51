"""Many workers on one study through PostgreSQL: they share it, and a killed one's trial ends FAIL."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from postgres_server import PostgresServer, find_bin

from evaluators.testing import write_tiny_open_clip
from search import run_folder as rf


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    if find_bin("initdb") is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql); .ci/run installs it")
    pytest.importorskip("psycopg")
    server = PostgresServer()
    url = server.start()
    yield url
    server.stop()


def write_config(path, fam, clip, url, name, trials, **extra):
    data = {
        "name": name, "models": {"model1": str(fam.a), "model2": str(fam.b)},
        "config_folder": str(fam.config_folder),
        "merge": {"vocabulary": "blocks", "arithmetic": "fast"},
        "probes": {"prompts": ["a red apple"], "seeds": [1], "steps": 2, "width": 64, "height": 64},
        "scorers": [{"kind": "clip", "model": str(clip[0]), "weights": str(clip[1])}],
        "warm_start": {"model1": False, "model2": False, "uniform": []},
        "trials": trials, "storage": url, "output": str(path.parent / "runs"), "device": "cpu",
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def worker(config):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "search.cli", "run", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_two_workers_share_one_study(tiny_sd1, tmp_path, postgres_url):
    clip = write_tiny_open_clip(tmp_path / "clip")
    config = write_config(tmp_path / "c.yaml", tiny_sd1, clip, postgres_url, "shared", 8)
    procs = [worker(config) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    done = rf.completed(study)
    assert 8 <= len(done) <= 9  # two workers may each start one last trial at the end
    assert len({t.number for t in done}) == len(done)
    assert len({t.user_attrs[rf.ATTR_WORKER] for t in done}) == 2
    assert all(rf.ATTR_RECIPE in t.user_attrs for t in done)


def test_killed_worker_leaves_a_fail_not_a_running_trial(tiny_sd1, tmp_path, postgres_url):
    clip = write_tiny_open_clip(tmp_path / "clip")
    slow = {"probes": {"prompts": ["a red apple"], "seeds": [1, 2, 3, 4], "steps": 30,
                       "width": 64, "height": 64, "batch_size": 1},
            "heartbeat_seconds": 1, "grace_seconds": 3}
    config = write_config(tmp_path / "c.yaml", tiny_sd1, clip, postgres_url, "killed", 3, **slow)
    first = worker(config)
    study = None
    for _ in range(600):
        time.sleep(0.1)
        try:
            study = optuna.load_study(study_name="killed", storage=postgres_url)
        except KeyError:
            continue
        running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        if running and running[0].number >= 1:  # one trial done, the next one under way
            break
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed = running[0].number
    time.sleep(4)  # past the grace period: its heartbeat has stopped
    second = worker(config)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err.decode()[-2000:]
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed].state == optuna.trial.TrialState.FAIL
    assert not [t for t in trials.values() if t.state == optuna.trial.TrialState.RUNNING]
    assert trials[0].state == optuna.trial.TrialState.COMPLETE  # finished work survives
    workers = {t.user_attrs.get(rf.ATTR_WORKER) for t in trials.values()
               if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(workers) == 2
    assert json.dumps(trials[0].user_attrs[rf.ATTR_RECIPE])
