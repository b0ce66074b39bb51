"""Studies survive what happens to real workers: Ctrl-C, SIGKILL, several workers on one
PostgreSQL server with one of them killed, two resumers started at once, two workers sharing
one SQLite file from the start.

Each worker is a real `mergesearch run` process. Afterwards: no COMPLETE trial lost or
changed, no trial stuck RUNNING, exactly the target of COMPLETE trials, and no parameter set
evaluated twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from child_signals import interruptible

from evaluators.testing import write_tiny_open_clip
from search import run_folder as rf
from search.cli import main
from search.liveness import STALE_REASON

COMPLETE, RUNNING, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                           optuna.trial.TrialState.FAIL)
# Trials slow enough (about a second: the search's own overhead no longer pads them) that a
# signal sent just after one starts lands in it, even while a loaded machine slows the poller.
SLOW_PROBES = {"prompts": ["a red apple"], "seeds": [1, 2], "steps": 16, "width": 64,
               "height": 64, "batch_size": 1}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("clip"), name="crash-clip", seed=0)


def write_config(folder: Path, fam, clip, name: str, trials: int, **extra) -> Path:
    data = {
        "name": name, "models": {"model1": str(fam.a), "model2": str(fam.b)},
        "config_folder": str(fam.config_folder), "merge": {"vocabulary": "blocks"},
        "probes": SLOW_PROBES,
        "scorers": [{"kind": "clip", "model": str(clip[0]), "weights": str(clip[1])}],
        "warm_start": {"model1": True, "model2": False, "uniform": []},
        "trials": trials, "output": str(folder / "runs"), "device": "cpu",
        "heartbeat_seconds": 1, "grace_seconds": 2, **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Worker:
    """`mergesearch run CONFIG` in its own process, its output in files."""

    count = 0

    def __init__(self, config: Path, trials: int | None = None):
        Worker.count += 1
        self.err_path = config.parent / f"worker{Worker.count}.err"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        more = ["--trials", str(trials)] if trials else []
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "search.cli", "run", str(config), *more],
                stdout=subprocess.DEVNULL, stderr=err, env=env, preexec_fn=interruptible)

    @property
    def tag(self) -> str:  # the `worker` attribute of its trials ends with its pid
        return f":{self.proc.pid}"

    def finish(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def err(self) -> str:
        return self.err_path.read_text()


def load(url: str, name: str) -> optuna.Study | None:
    db = rf.sqlite_file(url)
    if db is not None and not db.exists():  # opening would make the file the worker makes
        return None
    try:  # open_storage retries while the worker is still creating the schema
        if db is None:  # a server: one storage (one connection pool) per URL, however often polled
            storage = _server_storages.get(url) or _server_storages.setdefault(
                url, rf.open_storage(url))
        else:
            storage = rf.open_storage(url)
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


# polling opened a fresh engine 20 times a second; each kept its connection until garbage
# collection and the server ran out of clients ("too many clients already")
_server_storages: dict[str, optuna.storages.BaseStorage] = {}


def wait_for_fresh_trial(url: str, name: str, worker: Worker, min_complete: int,
                         timeout: float = 240) -> int:
    """Wait until ``worker`` has just started drawing a trial (and the study holds
    ``min_complete`` COMPLETE trials); return its number. A signal sent now lands inside that
    trial. A trial is drawing once its parameters are stored: the worker also holds the next
    trial, proposed ahead, RUNNING without parameters."""
    seen: set[int] = set()
    first = True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study = load(url, name)
        if study is not None:
            trials = study.get_trials(deepcopy=False)
            mine = [t for t in trials if t.state == RUNNING and t.params
                    and str(t.user_attrs.get(rf.ATTR_WORKER, "")).endswith(worker.tag)]
            done = sum(t.state == COMPLETE for t in trials)
            fresh = [t.number for t in mine if t.number not in seen and not first]
            if fresh and done >= min_complete:
                return fresh[0]
            seen.update(t.number for t in mine)
            first = False
        assert worker.proc.poll() is None, worker.err
        time.sleep(0.05)
    raise AssertionError(f"no fresh trial within {timeout} s:\n{worker.err}")


def snapshot(study: optuna.Study) -> dict[int, tuple]:
    return {t.number: (t.params, t.values) for t in study.get_trials() if t.state == COMPLETE}


def repeated(study: optuna.Study) -> list[str]:
    """Evaluated trials (all parameters drawn) whose parameters another one already had, each
    with the trial it repeats (number, state, worker)."""
    seen: dict[tuple, optuna.trial.FrozenTrial] = {}
    out = []
    for t in study.get_trials():
        if t.state == optuna.trial.TrialState.PRUNED or len(t.params) != 3:
            continue
        point = tuple(sorted(t.params.items()))
        if point in seen:
            first = seen[point]
            out.append(f"trial {t.number} ({t.state.name}, {t.user_attrs.get(rf.ATTR_WORKER)}) "
                       f"repeats {first.number} ({first.state.name}, "
                       f"{first.user_attrs.get(rf.ATTR_WORKER)}): {dict(point)}")
        seen.setdefault(point, t)
    return out


def check_end(study: optuna.Study, target: int, kept: dict[int, tuple]) -> None:
    trials = study.get_trials()
    assert sum(t.state == COMPLETE for t in trials) == target
    assert not [t.number for t in trials if t.state == RUNNING]
    assert repeated(study) == []
    assert all(rf.ATTR_RECIPE in t.user_attrs for t in trials if t.state == COMPLETE)
    now = snapshot(study)
    assert {n: now.get(n) for n in kept} == kept  # no COMPLETE trial lost or changed


def stop_while_drawing(config: Path, url: str, name: str, sig: int, min_complete: int
                       ) -> tuple[optuna.Study, int]:
    """A worker with a target it cannot reach gets ``sig`` just after a trial starts drawing:
    it exits 130 without a traceback, says what it stored, and leaves nothing RUNNING.
    Returns the study and the trial the signal was sent in."""
    worker = Worker(config, trials=100)
    trial = wait_for_fresh_trial(url, name, worker, min_complete=min_complete)
    worker.proc.send_signal(sig)
    assert worker.finish() == 130, worker.err
    assert "Traceback" not in worker.err
    study = load(url, name)
    assert f"interrupted: {len(snapshot(study))} of 100 trials are complete and stored" \
        in worker.err
    assert not [t.number for t in study.trials if t.state == RUNNING]  # nothing left running
    return study, trial


def test_ctrl_c_then_kill_then_resume_on_sqlite(tiny_sd1, clip, tmp_path, capsys):
    """SIGINT: exit 130, no traceback, the trial FAIL `interrupted`, the budget intact;
    SIGKILL: the trials it left RUNNING found stale on resume; two resumes reach the target
    exactly.

    The interrupted and the killed worker each get a target far beyond what they reach before
    the signal (however slowly a loaded machine lets the poller see their trials), so the
    signal always finds them drawing; the last resume's target is set from what they left."""
    config = write_config(tmp_path, tiny_sd1, clip, "crash", 6)
    url = rf.default_storage(tmp_path / "runs" / "crash")
    study, interrupted = stop_while_drawing(config, url, "crash", signal.SIGINT, min_complete=2)
    done = snapshot(study)
    # FAIL `interrupted`, or COMPLETE when a loaded machine let the poller see the trial so
    # late that it was stored before the signal landed (as in the SIGTERM test below)
    assert study.trials[interrupted].state in (FAIL, COMPLETE)
    assert all(t.user_attrs[rf.ATTR_FAIL] == "interrupted"
               for t in study.trials if t.state == FAIL)
    # the trial proposed ahead went back to the queue unstarted: no parameters stored
    assert all(not t.params for t in study.trials
               if t.state == optuna.trial.TrialState.WAITING)

    second = Worker(config, trials=100)
    wait_for_fresh_trial(url, "crash", second, min_complete=len(done) + 1)
    second.proc.kill()
    second.finish()
    kept = snapshot(load(url, "crash"))
    # what a killed worker leaves: the trial it was drawing and the one proposed ahead, or
    # only the latter when a loaded machine let the drawing finish before the kill landed
    killed = [t.number for t in load(url, "crash").trials if t.state == RUNNING]
    assert killed

    target = len(kept) + 3
    assert main(["run", str(config), "--trials", str(target)]) == 0  # the last resume, here
    err = capsys.readouterr().err
    study = load(url, "crash")
    check_end(study, target, {**done, **kept})
    assert all(study.trials[n].state == FAIL for n in killed)
    assert all(study.trials[n].user_attrs[rf.ATTR_FAIL] == STALE_REASON for n in killed)
    # each said, in one line or (a trial killed between its ask and its worker mark is stale
    # only after the grace period) two
    reported = [int(n) for line in re.findall(r"marked FAIL: trial\(s\) ([\d, ]+),", err)
                for n in line.split(", ")]
    assert sorted(reported) == killed, err


def test_sigterm_stops_a_worker_as_ctrl_c_does(tiny_sd1, clip, tmp_path):
    """SIGTERM (what `kill`, systemd, docker stop and Slurm's time limit send): the running
    trial is recorded `interrupted` at once, not left RUNNING for the next worker to find
    stale; exit 130, no traceback."""
    config = write_config(tmp_path, tiny_sd1, clip, "term", 6)
    url = rf.default_storage(tmp_path / "runs" / "term")
    study, stopped = stop_while_drawing(config, url, "term", signal.SIGTERM, min_complete=1)
    # What a SIGKILL leaves (see above) is a RUNNING trial; here none is. The signal lands in
    # the trial drawing when it is sent, or, on a loaded machine that let the poller see it
    # late, just after that trial was stored: then the next one never starts.
    assert study.trials[stopped].state in (FAIL, COMPLETE)
    assert all(t.user_attrs[rf.ATTR_FAIL] == "interrupted"
               for t in study.trials if t.state == FAIL)


def test_three_postgres_workers_one_killed(tiny_sd1, clip, tmp_path, postgres_url, capsys):
    """Two worker processes start together; one is killed mid-trial and a third worker (this
    test's own process) joins while the other still runs."""
    config = write_config(tmp_path, tiny_sd1, clip, "pg", 8, storage=postgres_url)
    workers = [Worker(config) for _ in range(2)]
    wait_for_fresh_trial(postgres_url, "pg", workers[0], min_complete=1)
    workers[0].proc.kill()
    workers[0].finish()
    kept = snapshot(load(postgres_url, "pg"))
    # the killed worker's trials left RUNNING: the one drawing and the one proposed ahead (only
    # the latter when a loaded machine let the drawing finish before the kill landed)
    killed = [n for n, t in enumerate(load(postgres_url, "pg").trials) if t.state == RUNNING
              and str(t.user_attrs.get(rf.ATTR_WORKER, "")).endswith(workers[0].tag)]
    assert killed
    mine = {n for n, t in enumerate(load(postgres_url, "pg").trials)
            if str(t.user_attrs.get(rf.ATTR_WORKER, "")).endswith(workers[0].tag)
            and t.state == COMPLETE}
    assert mine  # the killed worker finished trials first; they must survive it
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    assert workers[1].finish() == 0, workers[1].err
    assert "Traceback" not in workers[1].err
    study = load(postgres_url, "pg")
    check_end(study, 8, kept)
    assert all(study.trials[n].state == FAIL for n in killed)
    by_worker = {str(t.user_attrs.get(rf.ATTR_WORKER)) for t in study.trials
                 if t.state == COMPLETE}
    assert len(by_worker) == 3 and mine <= set(snapshot(study))


def test_two_resumers_at_once(tiny_sd1, clip, tmp_path):
    """Two `run`s of one config started together on a study that already holds trials."""
    from search.config import load_config
    from search.study import optimize, prepare

    config = write_config(tmp_path, tiny_sd1, clip, "twin", 2)
    study, ctx = prepare(load_config(config), log=lambda m: None)
    optimize(study, ctx, log=lambda m: None)
    kept = snapshot(study)
    assert len(kept) == 2
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "trials": 7}))
    workers = [Worker(config), Worker(config)]
    for worker in workers:
        assert worker.finish() == 0, worker.err
        assert "Traceback" not in worker.err
    study = load(rf.default_storage(tmp_path / "runs" / "twin"), "twin")
    check_end(study, 7, kept)
    assert study.user_attrs["warm_starts_enqueued"]
    assert sum(t.user_attrs.get("warm_start") == "model1" for t in study.trials) == 1


ASKER = """
import json, sys, time
import optuna
from search import run_folder as rf
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name="queue", storage=rf.open_storage(sys.argv[1], worker=True))
start = float(sys.argv[2])
while time.time() < start:
    pass
print(json.dumps([study.ask().number for _ in range(int(sys.argv[3]))]))
"""


def test_two_workers_asking_one_sqlite_queue_never_take_the_same_trial(tmp_path):
    """Optuna's ask reads the WAITING trials, then sets one RUNNING. Through the driver's own
    transactions (which begin only at the write) two processes could both read a trial
    WAITING and both take it: measured, 9 of 20 asks by two processes got a trial the other
    got too. A worker's SQLite storage begins every transaction with the write lock."""
    url = rf.default_storage(tmp_path)
    study = optuna.create_study(study_name="queue", storage=rf.open_storage(url))
    for i in range(40):
        study.enqueue_trial({"x": float(i)}, skip_if_exists=False)
    start = time.time() + 3  # both processes loaded, then asking at once
    askers = [subprocess.Popen([sys.executable, "-c", ASKER, url, str(start), "20"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
              for _ in range(2)]
    got = []
    for asker in askers:
        out, err = asker.communicate(timeout=120)
        assert asker.returncode == 0, err
        got.append(json.loads(out))
    assert sorted(got[0] + got[1]) == list(range(40)), got


def test_two_workers_started_together_on_a_new_sqlite_study(tiny_sd1, clip, tmp_path):
    """Both queue the warm starts and pop them at once: neither crashes (a duplicate's
    record once met a trial the other had finished), nothing is drawn twice, and together they
    stop at the target."""
    config = write_config(tmp_path, tiny_sd1, clip, "pair", 6,
                          warm_start={"model1": True, "model2": True, "uniform": [0.5]})
    workers = [Worker(config), Worker(config)]
    for worker in workers:
        assert worker.finish() == 0, worker.err
        assert "Traceback" not in worker.err
    study = load(rf.default_storage(tmp_path / "runs" / "pair"), "pair")
    check_end(study, 6, {})
    assert not [t.number for t in study.trials if t.state == FAIL]


class CtrlC(Exception):
    pass


@pytest.mark.parametrize("output_exists", [False, True])
def test_ctrl_c_while_a_new_study_opens_leaves_nothing_and_the_run_starts_again(
        tiny_sd1, clip, tmp_path, output_exists):
    """Ctrl-C after the study's database is made but before run.json is written (the
    "created study" line): neither the run folder nor a new output folder stays, nor a file
    in an output folder that was there; the same config then starts the run afresh."""
    from search.config import load_config
    from search.study import optimize, prepare

    config = write_config(tmp_path, tiny_sd1, clip, "opening", 1)
    runs = tmp_path / "runs"
    if output_exists:
        runs.mkdir()
        (runs / "mine.txt").write_text("a user's file")
    before = sorted(p.name for p in tmp_path.iterdir())

    def press_ctrl_c(line: str) -> None:
        if line.startswith("created study"):
            assert (runs / "opening" / "study.db").is_file()  # the window is real
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(load_config(config), log=press_ctrl_c)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if output_exists:
        assert [p.name for p in runs.iterdir()] == ["mine.txt"]
    study, ctx = prepare(load_config(config), log=lambda m: None)
    optimize(study, ctx, log=lambda m: None)
    assert [t.state for t in study.trials] == [COMPLETE]


def test_a_run_killed_while_it_started_is_named_so(tmp_path, capsys):
    """What a SIGKILL in that window leaves (a study.db, no run.json): `status`, `best` and
    `export` say so in one line and how to start it."""
    folder = tmp_path / "runs" / "killed"
    folder.mkdir(parents=True)
    optuna.create_study(study_name="killed", storage=rf.default_storage(folder))
    for command in (["status"], ["best"], ["export", "--to", "mbw"]):
        assert main([*command, str(folder)]) == 1
        err = capsys.readouterr().err.strip()
        assert "stopped while it started" in err and "mergesearch run" in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_ctrl_c_while_opening_never_removes_a_database_another_worker_made(tiny_sd1, clip,
                                                                          tmp_path):
    """Two workers started together: the other one makes the run folder's database first (as
    SQLite makes it: an empty file) between this worker's checks and its opening. Ctrl-C here
    then leaves that database and its folder alone: only the worker that made it takes a start
    back."""
    from search.config import load_config
    from search.study import prepare

    config = write_config(tmp_path, tiny_sd1, clip, "shared", 1)
    db = tmp_path / "runs" / "shared" / "study.db"

    def other_worker_then_ctrl_c(line: str) -> None:
        if line.startswith("opening study"):
            db.parent.mkdir(parents=True)
            db.touch()
        if line.startswith("created study"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(load_config(config), log=other_worker_then_ctrl_c)
    assert db.is_file()
    assert optuna.study.get_all_study_names(rf.default_storage(db.parent)) == ["shared"]


@pytest.mark.parametrize("b_looked", ["after", "before"])
def test_a_worker_waits_for_a_database_another_is_still_opening(tiny_sd1, clip, tmp_path,
                                                                b_looked):
    """Worker A makes the run folder's database and stops inside its opening window (after
    "created study", before run.json); worker B looked at the folder after A made it, or
    before (then it loads its pipeline and comes to open the study while A is inside).
    B must wait for A: A's Ctrl-C then takes back what A made, and B makes its own study and
    completes its trial. (Before the opening lock, B joined A's half-made study, and A's
    take-back removed the database and run.json under B.)"""
    import threading

    from search.config import load_config
    from search.study import optimize, prepare

    config = write_config(tmp_path, tiny_sd1, clip, "together", 1)
    folder = tmp_path / "runs" / "together"
    inside, release = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def worker_a() -> None:
        def pause_then_ctrl_c(line: str) -> None:
            if line.startswith("created study"):
                inside.set()
                release.wait(120)
                raise KeyboardInterrupt

        try:
            prepare(load_config(config), log=pause_then_ctrl_c)
        except KeyboardInterrupt:
            outcome["a"] = "interrupted"

    looked = threading.Event()

    def b_log(line: str) -> None:
        if b_looked == "before" and line.startswith("loading"):  # after its look at the folder
            looked.set()
            inside.wait(120)

    def worker_b() -> None:
        try:
            study, ctx = prepare(load_config(config), log=b_log)
            outcome["b_opened"] = True
            optimize(study, ctx, log=lambda m: None)
            outcome["b"] = "done"
        except BaseException as exc:  # noqa: B036 - the test reports it
            outcome["b"] = repr(exc)

    a, b = threading.Thread(target=worker_a), threading.Thread(target=worker_b)
    if b_looked == "before":
        b.start()
        assert looked.wait(120) and not folder.exists()
    a.start()
    assert inside.wait(120) and (folder / "study.db").is_file()
    if b_looked == "after":
        b.start()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and "b_opened" not in outcome:
        time.sleep(0.1)
    assert "b_opened" not in outcome  # B waits while A is inside its window
    release.set()
    a.join(120)
    b.join(300)
    assert outcome.get("a") == "interrupted" and outcome.get("b") == "done", outcome
    assert (folder / rf.RUN_FILE).is_file()
    study = optuna.load_study(study_name="together", storage=rf.default_storage(folder))
    assert [t.state for t in study.trials] == [COMPLETE]
