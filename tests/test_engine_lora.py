"""LoRAs on top of a merge: the engine equals the file merge, and strengths change in place."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from test_engine import live_original

from merge_backend import merge_to_file, open_checkpoint
from merge_backend.engine import MergeEngine
from merge_backend.lora import random_lora, save_lora
from merge_backend.pipeline import load_pipeline
from merge_backend.recipe import LoraSpec, Recipe, Source, uniform_ratios


@pytest.fixture(params=["sd1", "sdxl"])
def fam(request, tiny_sd1, tiny_sdxl):
    return {"sd1": tiny_sd1, "sdxl": tiny_sdxl}[request.param]


@pytest.fixture
def loras(fam, tmp_path):
    ckpt = open_checkpoint(fam.base)
    paths = []
    for seed, components in ((1, ("unet",)), (2, ("unet", "te1" if fam.arch == "sdxl" else "te"))):
        lora = random_lora(ckpt, rank=4, seed=seed, components=components, every=2, scale=0.2)
        paths.append(save_lora(lora, tmp_path / f"l{seed}.safetensors", dtype=torch.float32))
    return paths


@pytest.mark.parametrize("arithmetic", ["fast", "comfy"])
def test_engine_with_loras_equals_file(fam, loras, tmp_path, arithmetic):
    specs = (LoraSpec(str(loras[0]), 0.7, {"IN04": 0.0, "OUT02": 1.5}),
             LoraSpec(str(loras[1]), -0.4, te_strength=0.9))
    recipe = Recipe(arch=fam.arch, method="weighted_sum", vocabulary="mbw",
                    ratios={**uniform_ratios(fam.arch, "mbw", 0.35), "BASE": 0.6},
                    models={"model1": Source(str(fam.a)), "model2": Source(str(fam.b))},
                    arithmetic=arithmetic, loras=specs)
    engine = MergeEngine(load_pipeline(fam.a, config_folder=fam.config_folder), recipe)
    engine.apply(recipe.replace(loras=(replace(specs[0], strength=0.1), specs[1])))
    stats = engine.apply(recipe)  # only the LoRA strength changed: the touched blocks re-run
    assert 0 < stats.applied < len(engine.groups)
    path = tmp_path / "m.safetensors"
    merge_to_file(recipe, path, dtype="fp32")
    ref, live = load_file(path), live_original(engine)
    bad = [k for k, v in live.items() if k in ref and not torch.equal(v, ref[k])]
    assert not bad, bad[:3]
    # and the LoRA really changed something
    plain = recipe.replace(loras=())
    merge_to_file(plain, tmp_path / "plain.safetensors", dtype="fp32")
    base = load_file(tmp_path / "plain.safetensors")
    assert sum(not torch.equal(base[k], ref[k]) for k in ref) > 20
