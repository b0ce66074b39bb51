"""SD2.x end to end on its tiny family: written by `mergesearch tiny --arch sd2`, recognised,
drawn with v-prediction, searched by a CPU study, exported to a checkpoint and a ComfyUI
workflow. (Merge bit-exactness, the engine, LoRAs and the workflow's formulas are covered per
architecture in test_merge_cli, test_engine, test_lora_* and test_export_comfyui.)"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from evaluators.testing import write_tiny_open_clip
from merge_backend import open_checkpoint, recipe_from_checkpoint
from merge_backend.pipeline import load_pipeline
from search import run_folder as rf
from search.cli import main

OPEN_CLIP = "cond_stage_model.model."


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2")
    assert main(["tiny", str(folder), "--arch", "sd2"]) == 0
    return folder


def test_the_tiny_family_is_sd2_in_the_original_layout(family):
    sd = load_file(family / "base.safetensors")
    # OpenCLIP-H's own layout: one in_proj per layer, the last layer kept, the projection kept
    assert f"{OPEN_CLIP}transformer.resblocks.0.attn.in_proj_weight" in sd
    assert f"{OPEN_CLIP}text_projection" in sd and f"{OPEN_CLIP}logit_scale" in sd
    layers = {k.split(".")[4] for k in sd if k.startswith(f"{OPEN_CLIP}transformer.resblocks.")}
    config = json.loads((family / "config" / "text_encoder" / "config.json").read_text())
    assert len(layers) == config["num_hidden_layers"] + 1  # diffusers loads all but the last
    assert not any(k.startswith(("cond_stage_model.transformer.", "conditioner.")) for k in sd)
    assert open_checkpoint(family / "finetune_a.safetensors").arch.name == "sd2"


def test_it_loads_with_a_v_prediction_scheduler_and_draws(family):
    pipe = load_pipeline(family / "base.safetensors")  # config folder found by its size
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder.config.num_hidden_layers == 2
    out = pipe(["a red apple"], num_inference_steps=2, height=64, width=64, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all() and out.std() > 0


@pytest.fixture(scope="module")
def study_run(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd2-study")
    clip = write_tiny_open_clip(root / "clip", name="sd2-clip", seed=0)
    config = {
        "name": "sd2", "models": {"model1": str(family / "finetune_a.safetensors"),
                                  "model2": str(family / "finetune_b.safetensors")},
        "config_folder": str(family / "config"),
        "merge": {"vocabulary": "mbw", "arithmetic": "fast", "tied": [["IN00", "IN01"]]},
        "probes": {"prompts": ["a red apple"], "seeds": [1], "steps": 2, "width": 64,
                   "height": 64},
        "scorers": [{"kind": "clip", "model": str(clip[0]), "weights": str(clip[1])}],
        "warm_start": {"model1": True, "model2": False, "uniform": []},
        "trials": 3, "output": str(root / "runs"), "device": "cpu",
    }
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    return root / "runs" / "sd2"


def test_a_cpu_study_runs_and_exports_a_checkpoint_and_a_workflow(study_run, family, tmp_path):
    done = rf.completed(rf.RunFolder.load(study_run).study())
    assert len(done) == 3
    best = rf.trial_recipe(rf.ranked(rf.RunFolder.load(study_run).study())[0])
    assert best.arch == "sd2" and len(best.ratios) == 26  # BASE, IN00-11, M00, OUT00-11
    out = tmp_path / "exports"
    assert main(["export", str(study_run), "--best", "--to", "checkpoint", "--to", "comfyui",
                 "--dtype", "fp32", "-o", str(out)]) == 0
    ckpt = next(out.glob("*.safetensors"))
    assert recipe_from_checkpoint(ckpt) == best
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    assert (meta["modelspec.predict_key"], meta["modelspec.architecture"]) == (
        "v", "stable-diffusion-v2-768-v")
    assert open_checkpoint(ckpt).arch.name == "sd2"
    workflow = json.loads(next(out.glob("*.api.json")).read_text())
    kinds = [node["class_type"] for node in workflow.values()]
    assert "ModelMergeSD2" in kinds
    blend = next(n for n in workflow.values() if n["class_type"] == "ModelMergeSD2")["inputs"]
    assert blend["input_blocks.4."] == best.ratios["IN04"]
    assert blend["out."] == best.ratios["OUT11"]
