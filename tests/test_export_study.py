"""fp16 exports of real `fast` and `comfy` studies: the exported checkpoint is the scored
candidate, and the exported workflow, run with ComfyUI's formulas on the precisions the
Recipe names, rebuilds it (bit for bit for `comfy`, to float32 rounding for `fast`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_engine import live_original
from test_export_comfyui import UNET, evaluate_workflow

from merge_backend.engine import MergeEngine
from merge_backend.pipeline import load_pipeline
from search import cli
from search import run_folder as rf
from search.config import parse_config
from search.study import optimize, prepare

F16 = torch.float16


def _study(fam, tmp_path, arithmetic: str, unet_dtype: str | None):
    cfg = parse_config({
        "name": f"s-{arithmetic}-{unet_dtype}",
        "models": {"model1": str(fam.a), "model2": str(fam.b)},
        "config_folder": str(fam.config_folder),
        "merge": {"vocabulary": "blocks", "arithmetic": arithmetic, "unet_dtype": unet_dtype,
                  "text_encoder": {"mode": "merge", "ratio": 0.4}},
        "probes": {"prompts": ["a red apple"], "seeds": [1], "steps": 2, "cfg": 4.0,
                   "width": 64, "height": 64},
        "scorers": [{"kind": "sanity"}],
        "sampler": {"name": "random", "seed": 3},
        "warm_start": {"model1": False, "model2": False, "uniform": [0.37]},
        "trials": 2, "output": str(tmp_path / "runs"), "device": "cpu"})
    study, ctx = prepare(cfg, log=lambda m: None)
    optimize(study, ctx, log=lambda m: None)
    return cfg, study


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many fp16 steps apart two fp16 tensors are (-0 and +0 are the same value)."""
    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("arithmetic,unet_dtype", [("comfy", None), ("fast", None),
                                                   ("fast", "fp16")])
def test_fp16_export_of_a_study(tiny_sd1, tmp_path, arithmetic, unet_dtype):
    cfg, study = _study(tiny_sd1, tmp_path, arithmetic, unet_dtype)
    trial = rf.completed(study)[-1]
    recipe = rf.trial_recipe(trial)
    held = unet_dtype or "fp32"  # a CPU study holds its sources in fp32 unless told
    assert (recipe.arithmetic, recipe.unet_dtype, recipe.text_encoder_dtype) == (
        arithmetic, held, "fp32")
    out = tmp_path / "export"
    assert cli.main(["export", str(cfg.run_folder), "--trial", str(trial.number), "--to",
                     "checkpoint", "--to", "comfyui", "--dtype", "fp16", "-o", str(out),
                     "--quiet"]) == 0
    stem = next(out.glob("*.comfyui.api.json")).name.removesuffix(".comfyui.api.json")
    exported = load_file(out / f"{stem}.safetensors")
    # 1. the exported file is the scored candidate (the engine's live weights), in fp16
    engine = MergeEngine(load_pipeline(tiny_sd1.a, config_folder=tiny_sd1.config_folder), recipe)
    engine.apply(recipe)
    live = live_original(engine)
    keys = [k for k in live if k in exported]
    assert len(keys) > 600
    assert not [k for k in keys if not torch.equal(live[k].to(F16), exported[k])]
    # 2. the workflow, on ComfyUI holding the UNet in the Recipe's precision
    api = json.loads((out / f"{stem}.comfyui.api.json").read_text())
    files = {p.name: p for p in (tiny_sd1.a, tiny_sd1.b)}
    rebuilt = evaluate_workflow(api, files, unet={"fp32": torch.float32, "fp16": F16}[held])
    unet = [k for k in keys if k.startswith(UNET)]
    if arithmetic == "comfy":
        differ = [k for k in keys if not torch.equal(rebuilt[k].to(F16), exported[k])]
        assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    else:
        steps = torch.cat([_ulps_apart(rebuilt[k].to(F16), exported[k]).flatten() for k in unet])
        assert steps.max() <= 1 and (steps > 0).float().mean() < 5e-3, (
            f"{(steps > 0).float().mean():.2%} of UNet values differ, up to {steps.max()} steps")
    if held == "fp16":  # ComfyUI holding the UNet in fp32 instead rebuilds another file
        other = evaluate_workflow(api, files)
        steps = torch.cat([_ulps_apart(other[k].to(F16), exported[k]).flatten() for k in unet])
        assert (steps > 0).float().mean() > 0.05
