"""Bad input to `validate`, `run`, `status`, `best` and `export`: one clear message naming the
file or field, the right exit status, no traceback, nothing left behind, sources unchanged."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from evaluators.testing import write_tiny_open_clip
from search import run_folder as rf
from search.cli import main


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content's digest ("dir" for folders)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): "dir" if p.is_dir() else sha(p)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_tiny_open_clip(tmp_path_factory.mktemp("clip"), name="bad-input-clip", seed=0)


@pytest.fixture(scope="module")
def models(tiny_sd1, tmp_path_factory):
    """Copies of the tiny models the export cases may change (and put back)."""
    folder = tmp_path_factory.mktemp("models")
    return {role: Path(shutil.copy(path, folder / f"{role}.safetensors"))
            for role, path in (("model1", tiny_sd1.a), ("model2", tiny_sd1.b))}


def config_data(fam, clip, sources, out: Path, name: str = "bad", **over) -> dict:
    data = {
        "name": name, "models": {k: str(v) for k, v in sources.items()},
        "config_folder": str(fam.config_folder),
        "merge": {"vocabulary": "blocks"},
        "probes": {"prompts": ["a red apple"], "seeds": [1], "steps": 2, "width": 64,
                   "height": 64},
        "scorers": [{"kind": "clip", "model": str(clip[0]), "weights": str(clip[1])}],
        "warm_start": {"model1": True, "model2": False, "uniform": []},
        "trials": 2, "output": str(out / "runs"), "device": "cpu",
        "heartbeat_seconds": 1, "grace_seconds": 2,
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


class Check:
    """Runs one command line and checks everything a refusal must hold."""

    def __init__(self, capsys, watch: Path, sources: list[Path]):
        self.capsys = capsys
        self.watch = watch
        self.sources = sources

    def __call__(self, argv, *needles: str, status: int = 1) -> str:
        before, digests = tree(self.watch), {p: sha(p) for p in self.sources}
        self.capsys.readouterr()
        code = main([str(a) for a in argv])
        err = self.capsys.readouterr().err
        assert code == status, err
        for needle in needles:
            assert needle in err, err
        assert "Traceback" not in err
        assert [line for line in err.splitlines() if "error" in line.lower()][:1] == \
            [line for line in err.splitlines() if line.startswith("mergesearch: error: ")], err
        assert tree(self.watch) == before, "something was created or changed"
        assert {p: sha(p) for p in self.sources} == digests, "a source changed"
        return err


@pytest.fixture
def check(capsys, tmp_path, tiny_sd1, models, clip):
    return Check(capsys, tmp_path, [*tiny_sd1.files.values(), *models.values(), *clip])


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# ---------------------------------------------------------------------------- config and run


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../escape", "/abs", ".hidden"])
def test_name_that_is_not_one_plain_folder_name_is_refused(check, tmp_path, tiny_sd1, clip,
                                                           models, name):
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path, name=name))
    before_parent = tree(tmp_path.parent / "escape")
    check(["run", config], "name:", "plain folder name")
    assert tree(tmp_path.parent / "escape") == before_parent


@pytest.mark.parametrize("change,needles", [
    ({"trails": 5}, ["trails: unknown key (did you mean trials?)"]),
    ({"probes": {"widht": 64}}, ["probes.widht: unknown key (did you mean width?)"]),
    ({"merge": {"vocabulary": "blokcs"}}, ["merge.vocabulary:", "did you mean blocks?"]),
    ({"sampler": {"name": "tpe", "options": {"n_startup": 3}}},
     ["sampler.options.n_startup:", "did you mean n_startup_trials?"]),
    ({"heartbeat_seconds": 30, "grace_seconds": 2}, ["grace_seconds:", "use grace_seconds >= 60"]),
    ({"device": "cuda:abc"}, ["device: 'cuda:abc' is not a device"]),
    ({"merge": {"multiplier": "abc"}}, ["merge.multiplier: got 'abc'"]),
    ({"models": {"model2": "/nonexistent/b.safetensors"}},
     ["models.model2: /nonexistent/b.safetensors does not exist"]),
    # values that were accepted and then ignored, clipped, averaged or sent to the pipeline
    ({"probes": {"width": 1000000000}}, ["probes.width:", "less than or equal to 16384"]),
    ({"probes": {"steps": 99999}}, ["probes.steps:", "less than or equal to 10000"]),
    ({"scorers": [{"kind": "clip", "model": "{clip0}", "weights": "{clip1}", "weight": 0}]},
     ["scorers: every weight is 0"]),
    ({"merge": {"vocabulary": "mbw", "bounds": [0.2, 0.8]},
      "warm_start": {"presets": {"mine": {"IN04": 0.9}}}},
     ["warm_start.presets.mine.IN04: 0.9 is outside its bounds (0.2, 0.8)"]),
    ({"merge": {"vocabulary": "mbw", "fixed": {"IN04": 0.3}},
      "warm_start": {"presets": {"mine": {"IN04": 0.9}}}},
     ["warm_start.presets.mine.IN04: the block is fixed (merge.fixed) at 0.3"]),
    ({"storage": "sqlite://"}, ["storage: 'sqlite://' is an in-memory SQLite database"]),
    ({"storage": "sqlite:///:memory:"}, ["storage: 'sqlite:///:memory:' is an in-memory"]),
    ({"output": ""}, ["output: empty; name the folder"]),
    ({"merge": {"vocabulary": "mbw", "tied": [["IN04", "IN05"]]},
      "warm_start": {"presets": {"mine": {"IN04": 0.2, "IN05": 0.8}}}},
     ["warm_start.presets.mine: IN04, IN05 are tied (merge.tied)"]),
])
def test_config_field_errors_name_their_full_path(check, tmp_path, tiny_sd1, clip, models,
                                                  change, needles):
    if "scorers" in change:  # the scorer's files are the module's
        change = {"scorers": [{**change["scorers"][0], "model": str(clip[0]),
                               "weights": str(clip[1])}]}
    config = write(tmp_path / "c.yaml",
                   config_data(tiny_sd1, clip, models, tmp_path, **change))
    for command in ("validate", "run"):
        err = check([command, config], str(config), *needles)
        assert "errors.pydantic.dev" not in err and "validation error for" not in err


def test_every_broken_scorer_is_reported_at_once_with_its_field(check, tmp_path, tiny_sd1, clip,
                                                                models):
    scorers = [{"kind": "clip", "model": str(clip[0]), "weights": str(tmp_path / "gone.pt")},
               {"kind": "clip", "model": str(clip[0]), "weights": str(clip[1]), "batchsize": 2},
               {"kind": "clp"}]
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path,
                                                    scorers=scorers, trails=3))
    err = check(["run", config], "(4 problems)",
                f"scorers[0].weights: weights file {tmp_path / 'gone.pt'} does not exist",
                "scorers[1].batchsize: unknown key (did you mean batch_size?)",
                "scorers[2].kind: unknown scorer kind 'clp' (did you mean clip?)",
                "trails: unknown key (did you mean trials?)")
    assert "errors.pydantic.dev" not in err


@pytest.mark.parametrize("text,needle", [
    ("- just\n- a list\n", "expected a YAML mapping, got list"),
    ("name: [unclosed\n", "cannot read it"),
])
def test_config_file_that_is_not_a_mapping(check, tmp_path, text, needle):
    config = write(tmp_path / "c.yaml", text)
    check(["run", config], str(config), needle)


@pytest.mark.parametrize("kind", ["config", "prompt file", "ratios file"])
def test_a_yaml_syntax_error_is_one_line_naming_its_line_and_column(check, tmp_path, tiny_sd1,
                                                                    clip, models, kind):
    """PyYAML reports a syntax error on five lines (a prompt file's escaped as a traceback);
    the user gets one, naming the file and where it breaks (the bracket opened on line 2 is
    still open when the file ends on line 3)."""
    broken = write(tmp_path / "broken.yaml", "a: 1\nb: [unclosed\n")
    argv = {"config": ["run", broken],
            "prompt file": ["run", write(tmp_path / "c.yaml", config_data(
                tiny_sd1, clip, models, tmp_path, probes={"prompts": str(broken)}))],
            "ratios file": ["merge", "layers", tiny_sd1.a, tiny_sd1.b, "--vocabulary", "mbw",
                            "--ratios-file", broken, "-o", tmp_path / "out.safetensors"]}[kind]
    err = check(argv, f"{broken}: cannot read it (not valid YAML: line 3, column 1: ",
                "at line 2, column 4)")
    # one line; a config's problems come as a header and one line each
    assert len(err.strip().splitlines()) == (2 if kind == "prompt file" else 1), err


@pytest.mark.parametrize("kind", ["config", "ratios file"])
def test_a_key_given_twice_is_refused_naming_it_and_its_line(check, tmp_path, tiny_sd1, clip,
                                                             models, kind):
    """PyYAML keeps the last of two equal keys silently: a second `trials:` further down a
    config, or a block given twice in a ratios file, won unseen."""
    if kind == "config":
        text = yaml.safe_dump(config_data(tiny_sd1, clip, models, tmp_path)) + "trials: 500\n"
        twice = write(tmp_path / "c.yaml", text)
        argv = ["run", twice]
        line = text.count("\n")
        key = "trials"
    else:
        twice = write(tmp_path / "r.yaml", "IN04: 0.3\nOUT02: 0.5\nIN04: 0.9\n")
        argv = ["merge", "layers", tiny_sd1.a, tiny_sd1.b, "--ratios-file", twice, "-o",
                tmp_path / "out.safetensors"]
        line, key = 3, "IN04"
    check(argv, f"{twice}: cannot read it (not valid YAML: line {line}, column 1: found key "
          f"{key!r} twice")


def test_a_reference_scorer_without_references_in_a_config_file(check, tmp_path, tiny_sd1, clip,
                                                               models):
    """Only code can hand the reference scorer its images (set_references, as `mergesearch demo`
    does); a config file without `references:` would fail every trial, so `run` and `validate`
    refuse it before any work, naming the field."""
    scorer = {"kind": "reference", "model": str(clip[0]), "weights": str(clip[1])}
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path,
                                                    scorers=[scorer]))
    for command in ("run", "validate"):
        check([command, config], f"{config}: scorers[0].references: ", "give a folder")


def test_missing_config_file(check, tmp_path):
    check(["run", tmp_path / "nope.yaml"], str(tmp_path / "nope.yaml"), "cannot read it")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(check, tmp_path, tiny_sd1, clip, models):
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path,
                                                    device="cuda"))
    check(["run", config], "device: cuda, but", "use device: cpu")


def test_unreachable_storage_server(check, tmp_path, tiny_sd1, clip, models):
    pytest.importorskip("psycopg")
    url = "postgresql://nobody@127.0.0.1:1/none"  # port 1: refused at once
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path,
                                                    storage=url))
    check(["run", config], f"storage: cannot open {url}", "check the URL")


def test_a_relative_or_percent_encoded_sqlite_path_is_found_from_any_directory(
        tmp_path, tiny_sd1, clip, models, monkeypatch, capsys):
    """A relative sqlite:/// path resolves next to the config (as every path in it does) and
    is stored absolute; a %20 names a space, as SQLAlchemy reads it. The relative one was
    made in the working directory and stored relative (`status` failed from anywhere else);
    the encoded one was refused: 'folder .../with%20space does not exist'."""
    (tmp_path / "cfg" / "rel").mkdir(parents=True)
    (tmp_path / "with space").mkdir()
    (tmp_path / "elsewhere" / "rel").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    for name, url, db in [
            ("relative", "sqlite:///rel/x.db?timeout=20", tmp_path / "cfg" / "rel" / "x.db"),
            ("encoded", f"sqlite:///{str(tmp_path).replace(' ', '%20')}/with%20space/y.db",
             tmp_path / "with space" / "y.db")]:
        config = write(tmp_path / "cfg" / f"{name}.yaml", config_data(
            tiny_sd1, clip, models, tmp_path / "cfg", name=name, storage=url, trials=1,
            warm_start={"model1": True, "model2": False, "uniform": []}))
        assert main(["run", str(config)]) == 0, capsys.readouterr().err
        assert db.is_file() and not (tmp_path / "elsewhere" / "rel" / "x.db").exists()
        run = rf.RunFolder.load(tmp_path / "cfg" / "runs" / name)
        assert rf.sqlite_file(run.storage) == db
        assert run.storage.endswith("?timeout=20") == (name == "relative")  # its query kept
        monkeypatch.chdir(tmp_path)  # another directory: the run folder still finds its study
        assert main(["status", str(run.path)]) == 0
        assert "1 complete" in capsys.readouterr().out
        monkeypatch.chdir(tmp_path / "elsewhere")


def test_a_block_tied_to_itself_is_refused(check, tmp_path, tiny_sd1, clip, models):
    """[[IN04]] was refused as a tie of one block, [[IN04, IN04]] accepted (IN04+IN04)."""
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path, merge={
        "vocabulary": "mbw", "tied": [["IN04", "IN04"]]}))
    for command in ("validate", "run"):
        check([command, config], "merge.tied[0] (a tie needs two or more blocks)",
              "merge.tied[0].IN04 (twice in one tie)")


def test_a_server_url_without_its_driver_is_not_sent_to_the_postgres_extra(check, tmp_path,
                                                                            tiny_sd1, clip,
                                                                            models):
    url = "mysql://nobody@127.0.0.1:1/none"
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path,
                                                    storage=url))
    err = check(["run", config], f"storage: cannot open {url}", "driver is installed")
    assert "postgres" not in err


@pytest.mark.parametrize("argv", [["merge", "simple", "a", "b"], ["export", "RUN", "--to", "mbw"],
                                  ["compare", "RUN", "--trials", "0"],
                                  ["lora", "extract", "a", "b", "--rank", "4"]])
def test_an_empty_output_path_is_refused_not_taken_for_the_working_directory(argv, capsys):
    """`export -o ""` wrote into the working directory (pathlib reads '' as '.')."""
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "-o", ""])
    assert stopped.value.code == 2
    assert "argument -o/--output: an empty path" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["tiny", "toyworld"])
def test_tiny_and_toyworld_never_write_over_a_config_folder_already_there(check, tmp_path,
                                                                         command):
    """Their checkpoints were refused without --overwrite, but FOLDER/config/*.json were
    replaced by the generated diffusers configs."""
    mine = tmp_path / "f" / "config" / "model_index.json"
    mine.parent.mkdir(parents=True)
    mine.write_text('{"mine": 1}')
    check([command, tmp_path / "f"], f"{mine.parent} exists", "--overwrite")
    assert mine.read_text() == '{"mine": 1}'


@pytest.mark.parametrize("command", ["compare", "export"])
def test_a_bad_probes_file_is_one_line_naming_its_fields(check, done, tmp_path, command):
    """It was pydantic's 30-line report ('11 validation errors for ProbeSet'), naming no file."""
    bad = write(tmp_path / "p.yaml", "prompts: [a cat]\nsteps: 0\nwidth: 63\n")
    argv = {"compare": ["compare", done, "--trials", "0", "--probes", bad],
            "export": ["export", done, "--best", "--to", "report", "--probes", bad,
                       "-o", tmp_path / "out"]}[command]
    err = check(argv, f"{bad}: not a probe set (steps: ", "; width: ")
    assert len(err.strip().splitlines()) == 1 and "pydantic" not in err, err


def test_a_study_configs_probe_set_serves_as_a_probes_file(tmp_path, tiny_sd1, clip, models):
    from evaluators import ProbeSet

    data = config_data(tiny_sd1, clip, models, tmp_path)
    probes = ProbeSet.from_yaml(write(tmp_path / "c.yaml", data))
    assert [p.text for p in probes.prompts] == data["probes"]["prompts"]
    assert (probes.steps, probes.width) == (data["probes"]["steps"], data["probes"]["width"])


def test_sqlite_storage_in_a_missing_folder(check, tmp_path, tiny_sd1, clip, models):
    url = f"sqlite:///{tmp_path}/no/such/folder/s.db"
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path,
                                                    storage=url))
    check(["run", config], "storage:", "does not exist")


@pytest.mark.parametrize("where", ["a file", "NAME a file", "/proc"])
def test_an_output_that_takes_no_run_folder_is_refused_before_loading(check, tmp_path, tiny_sd1,
                                                                      clip, models, where):
    """`output` a file, output/NAME a file, or a folder that takes no new files (/proc: even
    for root) is found before the pipeline and the scorers load, naming the run folder."""
    if where == "a file":
        output = tmp_path / "runs.txt"
        output.write_text("not a folder")
        needles = [f"{output} is not a folder"]
    elif where == "NAME a file":
        output = tmp_path / "runs"
        output.mkdir()
        (output / "bad").write_text("not a run folder")
        needles = ["output: ", "is a file"]
    else:
        output = Path("/proc/mergesearch-test")
        needles = ["cannot write in /proc"]
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path,
                                                    output=str(output)))
    err = check(["run", config], str(output / "bad"), *needles)
    assert "loading" not in err, err


def test_unknown_block_name_for_the_checkpoint(check, tmp_path, tiny_sd1, clip, models):
    config = write(tmp_path / "c.yaml", config_data(
        tiny_sd1, clip, models, tmp_path, merge={"vocabulary": "mbw", "fixed": {"IN42": 0.5}}))
    check(["run", config], "merge.fixed.IN42")


def test_scorer_that_fails_to_load_leaves_nothing_and_locks_nothing(check, capsys, tmp_path,
                                                                    tiny_sd1, clip, models):
    """A scorer whose weights are another model's fails after the pipeline loaded: nothing is
    created, and the fixed config then runs under the same name."""
    broken = [{"kind": "clip", "model": str(clip[0]), "weights": str(tiny_sd1.base)}]
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path,
                                                    scorers=broken, trials=1))
    err = check(["run", config], "scorers[0]: scorer 'clip'", str(tiny_sd1.base))
    assert len([line for line in err.splitlines() if "error" in line]) == 1  # one line
    write(config, config_data(tiny_sd1, clip, models, tmp_path, trials=1))
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    assert len(rf.completed(rf.RunFolder.load(tmp_path / "runs" / "bad").study())) == 1


def test_study_that_never_ran_a_trial_is_made_again_with_a_fixed_config(tmp_path, tiny_sd1,
                                                                        clip, models, capsys):
    """A study locked to a broken config by an older version (made, then start-up failed)."""
    data = config_data(tiny_sd1, clip, models, tmp_path, trials=1)
    run = tmp_path / "runs" / "bad"
    run.mkdir(parents=True)
    study = optuna.create_study(study_name="bad", storage=rf.default_storage(run))
    study.set_user_attr("config", {"models": {}, "merge": {}, "probes": {}, "scorers": [],
                                   "objective": "weighted"})
    config = write(tmp_path / "c.yaml", data)
    assert main(["run", str(config)]) == 0, capsys.readouterr().err
    assert "never ran a trial; making it again" in capsys.readouterr().err
    assert len(rf.completed(rf.RunFolder.load(run).study())) == 1


def test_every_trial_failing_exits_non_zero_with_the_first_reason(tmp_path, tiny_sd1, clip,
                                                                 models, capsys):
    """Ratios a million times past the models (extrapolation allowed, no warm start) make
    every candidate's weights overflow into NaN pictures."""
    config = write(tmp_path / "c.yaml", config_data(
        tiny_sd1, clip, models, tmp_path, trials=3,
        merge={"allow_extrapolation": True, "bounds": [1e6, 2e6]},
        warm_start={"model1": False, "model2": False, "uniform": []}))
    assert main(["run", str(config)]) == 1
    printed = capsys.readouterr()
    err = printed.err
    assert "error: every trial of this run failed (5); the first, trial 0:" in err
    # nothing to export, compare or rank: only the dashboard is suggested (it shows the failures)
    assert "mergesearch dashboard" in printed.out
    assert not any(f"mergesearch {c}" in printed.out for c in ("export", "compare", "best"))
    assert "NaN" in err.split("the first, trial 0:")[1]
    assert "Traceback" not in err
    study = rf.RunFolder.load(tmp_path / "runs" / "bad").study()
    assert [t.state.name for t in study.trials] == ["FAIL"] * 5


# ---------------------------------------------------------------------------- status, export


@pytest.fixture(scope="module")
def done(tiny_sd1, clip, models, tmp_path_factory):
    """A finished run (3 COMPLETE trials) the status and export cases read."""
    from search.config import parse_config
    from search.study import optimize, prepare

    out = tmp_path_factory.mktemp("done")
    cfg = parse_config(config_data(tiny_sd1, clip, models, out, name="done", trials=3))
    study, ctx = prepare(cfg, log=lambda m: None)
    optimize(study, ctx, log=lambda m: None)
    return cfg.run_folder


@pytest.fixture
def run_copy(done, tmp_path):
    return Path(shutil.copytree(done, tmp_path / "run"))


@pytest.mark.parametrize("command", [["status"], ["best"], ["export", "--to", "mbw"]])
@pytest.mark.parametrize("content,needle", [
    ("{}", "lacks study_name and storage"),
    ("not json {", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_broken_run_json(check, run_copy, command, content, needle):
    (run_copy / rf.RUN_FILE).write_text(content)
    check([command[0], run_copy, *command[1:]], str(run_copy / rf.RUN_FILE), needle,
          "mergesearch run CONFIG")


@pytest.mark.parametrize("command", [["status"], ["export", "--to", "mbw"]])
def test_folder_that_is_not_a_run(check, tmp_path, command):
    (tmp_path / "plain").mkdir()
    check([command[0], tmp_path / "plain", *command[1:]], str(tmp_path / "plain"),
          "run folder")


def test_status_of_a_missing_folder(check, tmp_path):
    check(["status", tmp_path / "nowhere"], str(tmp_path / "nowhere"), "no such run folder")


def test_a_file_given_for_a_run_folder(check, tiny_sd1):
    """`mergesearch best model.safetensors`: the path exists, it is just not a folder."""
    check(["best", tiny_sd1.a], f"{tiny_sd1.a}: a file, not a run folder")


def test_run_json_naming_another_study(check, run_copy):
    meta = json.loads((run_copy / rf.RUN_FILE).read_text())
    (run_copy / rf.RUN_FILE).write_text(json.dumps({**meta, "study_name": "other"}))
    check(["status", run_copy], "has no study 'other'")


def test_run_folder_whose_database_is_gone(check, run_copy):
    meta = json.loads((run_copy / rf.RUN_FILE).read_text())
    gone = run_copy / "gone.db"
    (run_copy / rf.RUN_FILE).write_text(json.dumps({**meta, "storage": f"sqlite:///{gone}"}))
    check(["best", run_copy], str(gone), "does not exist")


@pytest.mark.parametrize("command", ["status", "best", "dashboard"])
def test_an_empty_database_file_is_refused_not_given_a_schema(check, run_copy, command):
    """A study.db truncated to 0 bytes (a full disk, a bad copy) held the study once: opening
    it wrote an empty schema into it, and `status` said the study did not exist."""
    db = rf.sqlite_file(rf.RunFolder.load(run_copy).storage)
    assert db.parent == run_copy
    db.write_bytes(b"")
    check([command, run_copy], f"{db} is empty (0 bytes)")
    assert db.stat().st_size == 0


def test_export_of_a_trial_that_does_not_exist(check, done):
    check(["export", done, "--trial", "99", "--to", "mbw"], "has no trial 99")


def test_export_file_name_for_two_formats(check, done, tmp_path):
    check(["export", done, "--to", "mbw", "--to", "comfyui", "-o", tmp_path / "x.txt"],
          "names a file", "give a folder")


@pytest.mark.parametrize("name", ["x.txt", "x.ckpt", "x.PT"])
def test_export_file_name_with_another_formats_suffix(check, done, tmp_path, name):
    """A .ckpt is refused, not taken for a folder name: exports never write pickles."""
    check(["export", done, "--to", "checkpoint", "-o", tmp_path / name],
          "--to checkpoint writes a .safetensors file", "give a folder")


@pytest.mark.parametrize("argv,needle", [(["best", "--top", "0"], "--top 0"),
                                         (["best", "--top", "-1"], "--top -1"),
                                         (["export", "--pareto", "0", "--to", "mbw"], "--pareto 0"),
                                         (["export", "--pareto", "-2", "--to", "mbw"], "--pareto -2")])
def test_counts_of_trials_below_one(check, done, argv, needle):
    check([argv[0], done, *argv[1:]], needle, "1 or more")


def test_export_top_below_zero(check, done):
    """`export --to report --top K` shows the best K trials (0: none); below 0 is refused."""
    check(["export", done, "--top", "-1", "--to", "report"], "--top -1", "0 or more")


@pytest.mark.parametrize("timeout", ["0", "-5", "nan"])
def test_run_refuses_a_timeout_that_is_not_a_time(check, tmp_path, tiny_sd1, clip, models,
                                                  timeout):
    """0 and -5 ran as if no timeout were given; nan stopped before the first trial as if time
    had run out (exit 124)."""
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path))
    check(["run", config, "--timeout", timeout], f"--timeout {timeout}: ", "more than 0")


@pytest.mark.parametrize("trials", ["0", "-5"])
def test_run_and_demo_refuse_trials_below_one(check, tmp_path, tiny_sd1, clip, models, trials):
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path))
    check(["run", config, "--trials", trials], f"--trials {trials}", "1 or more")
    check(["demo", "--folder", tmp_path / "demo", "--trials", trials], f"--trials {trials}",
          "1 or more")


@pytest.mark.parametrize("flags,needle", [(["--candidates", "1"], "--candidates 1"),
                                          (["--port", "70000"], "--port 70000")])
def test_demo_preference_checks_its_flags_before_writing_anything(check, tmp_path, flags,
                                                                  needle):
    """Both were found after the models and FOLDER/preference.yaml were written, --candidates
    as `preference.yaml: … preference.candidates`."""
    check(["demo", "--folder", tmp_path / "demo", "--preference", *flags], needle)


def test_demo_flags_of_a_preference_demo_are_refused_without_it(check, tmp_path):
    """`demo --candidates 3` ran the scorer demo and ignored the flag."""
    check(["demo", "--folder", tmp_path / "demo", "--candidates", "3", "--port", "9000"],
          "--candidates, --port: only a --preference demo")


def test_export_lora_without_base(check, done):
    check(["export", done, "--to", "lora"], "--base")


def test_export_of_a_source_changed_since_the_study(check, done, models):
    data = models["model2"].read_bytes()
    try:
        models["model2"].write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        check.sources = [p for p in check.sources if p != models["model2"]]
        check(["export", done, "--to", "mbw"], "recipe.models.model2", "changed since")
    finally:
        models["model2"].write_bytes(data)


def test_export_of_a_missing_source(check, done, models):
    moved = models["model1"].with_suffix(".moved")
    models["model1"].rename(moved)
    try:
        check.sources = [p for p in check.sources if p != models["model1"]]
        check(["export", done, "--to", "mbw"], "recipe.models.model1", "is missing")
    finally:
        moved.rename(models["model1"])


def test_study_name_taken_by_another_config(check, done, tiny_sd1, clip, models, tmp_path):
    data = config_data(tiny_sd1, clip, models, done.parent.parent, name="done",
                       merge={"vocabulary": "single"})
    config = write(tmp_path / "c.yaml", data)
    check.watch = done
    check(["run", config], "name: study 'done'", "give the new config another name")


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("device,needles", [
    ("foo", ["--device 'foo' is not a device"]),
    pytest.param("cuda", ["--device cuda, but", "use --device cpu"], marks=NO_CUDA),
])
@pytest.mark.parametrize("command", ["lora extract", "lora apply", "export", "compare"])
def test_a_device_this_machine_lacks_is_refused_before_work(check, done, tiny_sd1, tmp_path,
                                                            device, needles, command):
    out = tmp_path / "out.safetensors"
    argv = {"lora extract": ["lora", "extract", tiny_sd1.a, tiny_sd1.b, "--rank", "4", "-o", out],
            "lora apply": ["lora", "apply", tiny_sd1.a, tmp_path / "style.safetensors", "-o", out],
            "export": ["export", done, "--to", "report", "-o", tmp_path / "r"],
            "compare": ["compare", done, "--trials", "0", "-o", tmp_path / "c.html"]}[command]
    check([*argv, "--device", device], *needles)


LINUX = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")


@pytest.mark.parametrize("command", ["merge", "lora extract", "compare"])
def test_an_output_that_is_a_folder_says_so_at_once(check, done, tiny_sd1, tmp_path, command):
    """It said `exists; pass --overwrite`, and with --overwrite, `is a folder`."""
    out = tmp_path / ("x.html" if command == "compare" else "x.safetensors")
    out.mkdir()
    argv = {"merge": ["merge", "simple", tiny_sd1.a, tiny_sd1.b, "-o", out],
            "lora extract": ["lora", "extract", tiny_sd1.a, tiny_sd1.b, "--rank", "4", "-o", out],
            "compare": ["compare", done, "--trials", "0", "-o", out]}[command]
    err = check(argv, f"output {out} is a folder; name the file to write")
    assert "--overwrite" not in err


@LINUX
@pytest.mark.parametrize("command", ["merge", "lora extract", "export checkpoint",
                                     "export diffusers", "export comfyui", "tiny", "compare"])
def test_a_folder_that_takes_no_files_is_refused_before_work(check, done, tiny_sd1, tmp_path,
                                                             command):
    """/proc takes no new files, even for root (who passes every permission check): the
    output is refused before the merge, the SVDs or the export start, naming the output."""
    out = Path("/proc/mergesearch-test")
    argv = {"merge": ["merge", "simple", tiny_sd1.a, tiny_sd1.b, "-o", f"{out}.safetensors"],
            "lora extract": ["lora", "extract", tiny_sd1.a, tiny_sd1.b, "--rank", "4", "-o",
                             f"{out}.safetensors"],
            "export checkpoint": ["export", done, "--best", "--to", "checkpoint", "-o",
                                  f"{out}.safetensors"],
            "export diffusers": ["export", done, "--best", "--to", "diffusers", "-o", out],
            "export comfyui": ["export", done, "--best", "--to", "comfyui", "-o", f"{out}.json"],
            "tiny": ["tiny", out],
            "compare": ["compare", done, "--trials", "0", "-o", f"{out}.html"]}[command]
    err = check(argv, "cannot write in /proc")
    assert ".partial" not in err and "Errno" not in err, err
    assert "merging" not in err and "skipped" not in err, err  # no work was started


def test_an_os_error_names_the_output_not_its_temporary_name():
    """A write that fails midway (a full disk) fails on the temporary name it writes under;
    the user is told the output's name."""
    from search.cli import os_error_line

    full = OSError(errno.ENOSPC, "No space left on device",
                   "/data/.best.safetensors.4242-123456@myhost.partial")
    assert os_error_line(full) == "/data/best.safetensors: No space left on device"
    renamed = OSError(errno.EXDEV, "Invalid cross-device link",
                      "/a/.x.json.1-2@h.partial", None, "/b/x.json")  # (.., winerror, filename2)
    assert os_error_line(renamed) == "/b/x.json: Invalid cross-device link"
    assert os_error_line(OSError("--port 1: cannot listen")) == "--port 1: cannot listen"


@pytest.mark.parametrize("port", ["65536", "99999", "-1"])
def test_a_port_outside_tcps_range(check, done, port):
    check(["dashboard", done, "--port", port], f"--port {port}: a TCP port is 0-65535")


@pytest.mark.parametrize("host", ["999.1.1.1", "no-such-host.invalid", "192.0.2.1"])
def test_a_host_this_machine_cannot_listen_on_is_named(check, done, host):
    """A mistyped name or address (192.0.2.1: TEST-NET, never this machine's) is blamed on
    --host, not on the port."""
    check(["dashboard", done, "--host", host, "--port", "0"], f"--host {host}: ",
          "not an address of this machine")


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path, tiny_sd1, clip, models):
    """`mergesearch validate CONFIG | head -1`: the pipe closes while the command writes; it
    stops without an error message or a traceback, with SIGPIPE's status, as `git` or `grep`."""
    import subprocess
    import sys

    prompts = [f"a red apple, picture {i} of a long list" for i in range(3000)]  # > 64 KiB
    config = write(tmp_path / "c.yaml", config_data(tiny_sd1, clip, models, tmp_path,
                                                    probes={"prompts": prompts}))
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", "validate", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert first and err == ""
