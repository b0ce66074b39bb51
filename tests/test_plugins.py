"""A package outside the project (tests/plugin_pkg) adds a merge method, a scorer and a sampler
through entry points: each passes its kind's contract, and `mergesearch run` (in a subprocess,
with only that folder put on PYTHONPATH, as an installed package would be) uses all three."""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evaluators.scorer_contract import ScorerContract
from merge_backend.methods.contract import MergeMethodContract
from search.sampler_contract import SamplerContract

PLUGINS = Path(__file__).parent / "plugin_pkg"
PACKAGE = "mergesearch_example_plugins"
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning",
                                        "ignore:Heartbeat of storage:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def installed():
    """The plug-in package on sys.path while this module runs, as if it were installed (its
    hand-written dist-info is what importlib.metadata reads)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(PLUGINS))
        yield


def _env() -> dict[str, str]:
    paths = [str(PLUGINS), os.environ.get("PYTHONPATH", str(Path(__file__).parents[1]))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def test_the_dist_info_says_what_the_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((PLUGINS / "pyproject.toml").read_text())["project"]["entry-points"]
    written = configparser.ConfigParser()
    written.read(PLUGINS / f"{PACKAGE}-0.1.dist-info" / "entry_points.txt")
    assert {g: dict(written[g]) for g in written.sections()} == declared


# ---------------------------------------------------------------------------- the contracts


class TestClampedDifference(MergeMethodContract):
    method = "clamped_difference"
    multipliers = (0.7, 0.05, 2.0)

    @pytest.fixture(scope="class")
    @classmethod
    def family(cls, tiny_sd1):
        return tiny_sd1

    def formula(self, tensors, ratio, multiplier):
        a, b = (t.float() for t in tensors)
        step = torch.minimum(torch.maximum(b - a, torch.tensor(-multiplier)),
                             torch.tensor(multiplier))
        return a + (1.0 - ratio) * step


def test_the_plug_in_method_checks_its_recipes(tiny_sd1):
    from merge_backend import Recipe, RecipeError, Source

    recipe = Recipe(arch="sd1", method="clamped_difference", vocabulary="single",
                    ratios={"all": 0.5}, multiplier=-1.0,
                    models={"model1": Source(str(tiny_sd1.a)), "model2": Source(str(tiny_sd1.b))})
    with pytest.raises(RecipeError, match="recipe.multiplier = -1.0: clamped_difference"):
        recipe.validate()


class BrightnessContract(ScorerContract):
    kind = "brightness"

    def config(self, folder):
        (folder / "target.json").write_text('{"mean": 0.4}')
        return {"kind": self.kind, "target": str(folder / "target.json")}


class TestBrightnessByEntryPoint(BrightnessContract):
    pass


class TestBrightnessByImportPath(BrightnessContract):
    kind = f"{PACKAGE}.scorers:Brightness"


class TestUniformByEntryPoint(SamplerContract):
    sampler = "uniform"


class TestUniformByImportPath(SamplerContract):
    sampler = f"{PACKAGE}.samplers:UniformSampler"


def test_a_name_that_is_no_plug_in_is_refused_with_the_reason():
    from evaluators import ScorerError, scorer_config
    from search.samplers import SamplerError, sampler_entry

    with pytest.raises(ScorerError, match="cannot be imported: ModuleNotFoundError"):
        scorer_config({"kind": "no_such_package.mod:Thing"})
    with pytest.raises(SamplerError, match="neither an Optuna sampler class"):
        sampler_entry(f"{PACKAGE}.scorers:Brightness")


# ---------------------------------------------------------------------------- a study


@pytest.fixture(scope="module")
def plugin_study(tiny_sd1, tmp_path_factory):
    """`mergesearch run` with the plug-in method, two plug-in scorers (by entry point and by
    import path, their files named relative to the YAML) and the plug-in sampler."""
    folder = tmp_path_factory.mktemp("plugin_study")
    (folder / "files").mkdir()
    (folder / "files" / "target.json").write_text('{"mean": 0.45}')
    (folder / "files" / "dark.json").write_text('{"mean": 0.1}')
    config = {
        "name": "plugged", "models": {"model1": str(tiny_sd1.a), "model2": str(tiny_sd1.b)},
        "config_folder": str(tiny_sd1.config_folder),
        "merge": {"method": "clamped_difference", "vocabulary": "blocks",
                  "multiplier": {"low": 0.01, "high": 0.2}},
        "probes": {"prompts": ["a red apple"], "seeds": [1], "steps": 2, "width": 64,
                   "height": 64},
        "scorers": [{"kind": "brightness", "target": "files/target.json"},
                    {"kind": f"{PACKAGE}.scorers:Brightness", "name": "dark",
                     "target": "files/dark.json", "weight": 0.5}],
        "sampler": {"name": "uniform", "seed": 1},
        "warm_start": {"model1": False, "model2": False, "uniform": []},
        "trials": 3, "output": "runs", "device": "cpu",
    }
    (folder / "study.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "search.cli", "run", "study.yaml"], cwd=folder,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return folder / "runs" / "plugged", config


def test_a_study_uses_the_plug_in_method_scorers_and_sampler(plugin_study):
    from search import run_folder as rf
    from search.samplers import trial_seed

    run, config = plugin_study
    study = rf.RunFolder.load(run).study()
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for trial in trials:
        assert trial.user_attrs[rf.ATTR_RECIPE]["method"] == "clamped_difference"
        scores = trial.user_attrs[rf.ATTR_SCORES]
        assert set(scores) == {"brightness", "dark"}
        assert all(-1.0 <= v <= 0.0 for v in scores.values()), scores
        # UniformSampler's draws, written out: one generator seeded per trial, in the order
        # the study asks for its parameters
        rng = np.random.RandomState(trial_seed(1, trial.number))
        bounds = {"input": (0.0, 1.0), "middle": (0.0, 1.0), "out": (0.0, 1.0),
                  "multiplier": (0.01, 0.2)}
        expected = {name: low + rng.rand() * (high - low) for name, (low, high) in bounds.items()}
        assert trial.params == expected
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["scorers"][0]["target"] == str(run.parents[1] / "files" / "target.json")


def test_the_plug_in_method_exports_a_checkpoint_and_refuses_a_workflow(plugin_study, tiny_sd1,
                                                                          tmp_path):
    from search import run_folder as rf

    run, _ = plugin_study
    out = tmp_path / "best.safetensors"
    proc = subprocess.run([sys.executable, "-m", "search.cli", "export", str(run), "--best",
                           "--to", "checkpoint", "-o", str(out), "--dtype", "fp32", "--quiet"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    recipe = rf.trial_recipe(rf.RunFolder.load(run).study().best_trial)
    a, b, got = load_file(str(tiny_sd1.a)), load_file(str(tiny_sd1.b)), load_file(str(out))
    prefix = "model.diffusion_model."
    m = recipe.multiplier
    for key, w1 in a.items():
        if key.startswith(prefix):
            block = "middle" if key[len(prefix):].startswith("middle_block.") else \
                "out" if key[len(prefix):].startswith(("output_blocks.", "out.")) else "input"
            step = torch.minimum(torch.maximum(b[key] - w1, torch.tensor(-m)), torch.tensor(m))
            assert torch.equal(got[key], w1 + (1.0 - recipe.ratios[block]) * step), key
    refused = subprocess.run([sys.executable, "-m", "search.cli", "export", str(run), "--best",
                              "--to", "comfyui", "-o", str(tmp_path / "wf.json")],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    assert "ComfyUI has no merge node that clamps a difference" in refused.stderr
    assert not (tmp_path / "wf.json").exists()


def test_merge_with_built_ins_reads_no_entry_points(tiny_sd1, tmp_path):
    """The plug-ins are installed, yet `mergesearch merge` (built-in methods) never scans."""
    argv = ["merge", "simple", str(tiny_sd1.a), str(tiny_sd1.b), "-o", str(tmp_path / "m.safetensors"),
            "--ratio", "0.3", "--clip", "simple", "--quiet"]
    code = ("import sys; import merge_backend.plugins as p; seen = set(); scan = p._scan; "
            "p._scan = lambda group, path: seen.add(group) or scan(group, path); "
            f"from search.cli import main; assert main({argv!r}) == 0; "
            f"print(sorted(seen), {PACKAGE!r} in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # architectures are read whole (detection needs them all); methods only on an unknown name
    assert proc.stdout.split("\n")[-2] == "['mergesearch.architectures'] False"
    listed = subprocess.run([sys.executable, "-c", "from merge_backend import METHODS; "
                             "print(list(METHODS))"], env=_env(), capture_output=True, text=True)
    assert json.loads(listed.stdout.replace("'", '"'))[-1] == "clamped_difference"
