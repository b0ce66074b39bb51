"""The in-memory merge engine equals the merged checkpoint, in place, on tiny real pipelines."""

import comfyui_reference
import pytest
import torch
from safetensors.torch import load_file

from merge_backend import ClipMerge, IncompatibleSourcesError, Recipe, RecipeError, Source, merge_to_file
from merge_backend.architectures import ARCHITECTURES
from merge_backend.engine import MergeEngine
from merge_backend.engine_memory import EngineMemoryError, plan_memory
from merge_backend.naming import to_original
from merge_backend.pipeline import load_pipeline
from merge_backend.recipe import uniform_ratios

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def fam(request, tiny_sd1, tiny_sd2, tiny_sdxl):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[request.param]


def recipe_for(fam, method="weighted_sum", vocabulary="comfy", arithmetic="comfy", clip=None,
               seed=0):
    g = torch.Generator().manual_seed(seed)
    models = {"model1": Source(str(fam.a)), "model2": Source(str(fam.b))}
    if method == "add_difference":
        models["base"] = Source(str(fam.base))
    ratios = {}
    if method in ("weighted_sum", "add_difference"):
        ratios = {k: round(float(v), 3) for k, v in zip(
            uniform_ratios(fam.arch, vocabulary, 0), torch.rand(40, generator=g))}
    return Recipe(arch=fam.arch, method=method, models=models, vocabulary=vocabulary,
                  ratios=ratios, multiplier=0.7, clip=clip, arithmetic=arithmetic)


def live_original(engine):
    """The live pipeline's merged weights, in the original layout."""
    arch = ARCHITECTURES[engine.bound.arch]
    out = {}
    for component in ("unet",) + tuple(te.name for te in arch.text_encoders):
        module = engine.module(component)
        config = dict(module.config) if component == "unet" else None
        out.update(to_original(arch, component, module.state_dict(), config))
    return out


def assert_engine_equals_file(engine, recipe, tmp_path, dtype="fp32"):
    path = tmp_path / "ref.safetensors"
    merge_to_file(recipe, path, dtype=dtype, overwrite=True)
    ref = load_file(path)
    live = live_original(engine)
    bad = [k for k, v in live.items() if k in ref and not torch.equal(v, ref[k].to(v.dtype))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    assert len([k for k in live if k in ref]) > 600


@pytest.fixture
def pipe_of(fam):
    return lambda device="cpu", dtype=torch.float32: load_pipeline(
        fam.a, config_folder=fam.config_folder, device=device, dtype=dtype)


@pytest.mark.parametrize("method,vocabulary,arithmetic,clip", [
    ("weighted_sum", "comfy", "comfy", None),
    ("weighted_sum", "mbw", "fast", None),
    ("weighted_sum", "blocks", "fast", ClipMerge("weighted_sum", 0.3)),
    ("weighted_sum", "single", "comfy", ClipMerge("subtract", 1.0, 0.5)),
    ("subtract", "single", "comfy", None),
    ("add", "single", "comfy", ClipMerge("add")),
    ("add_difference", "comfy", "comfy", None),
    ("add_difference", "mbw", "fast", None),
])
def test_engine_equals_merged_checkpoint(fam, pipe_of, tmp_path, method, vocabulary, arithmetic,
                                         clip):
    recipe = recipe_for(fam, method, vocabulary, arithmetic, clip)
    engine = MergeEngine(pipe_of(), recipe)
    engine.apply(recipe)
    assert_engine_equals_file(engine, recipe, tmp_path)


@pytest.mark.parametrize("device", DEVICES)
def test_images_after_apply_equal_images_of_checkpoint(fam, pipe_of, tmp_path, device):
    recipe = recipe_for(fam, vocabulary="mbw", arithmetic="fast")
    pipe = pipe_of(device)
    engine = MergeEngine(pipe, recipe, device=device)
    engine.apply(recipe_for(fam, vocabulary="mbw", arithmetic="fast", seed=5))  # something else first
    engine.apply(recipe)
    path = tmp_path / "m.safetensors"
    merge_to_file(recipe, path, dtype="fp32")
    ref = load_pipeline(path, config_folder=fam.config_folder, device=device)

    def draw(p):
        g = torch.Generator(device).manual_seed(3)
        return p("a red apple", num_inference_steps=3, height=64, width=64, generator=g,
                 output_type="pt").images
    assert torch.equal(draw(pipe), draw(ref))


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_incremental_and_skipping(fam, pipe_of, device):
    r1 = recipe_for(fam, vocabulary="mbw", arithmetic="fast", seed=1)
    r2 = r1.replace(ratios={**r1.ratios, "IN04": 0.123, "M00": 0.9})
    engine = MergeEngine(pipe_of(device), r1, device=device)
    addresses = engine.addresses()
    engine.apply(r1)
    stats = engine.apply(r2)
    assert stats.applied == 2 and stats.skipped == len(engine.groups) - 2
    assert engine.apply(r2).applied == 0
    assert engine.addresses() == addresses  # parameters never move
    incremental = {k: v.clone() for k, v in live_original(engine).items()}
    fresh = MergeEngine(pipe_of(device), r2, device=device)
    fresh.apply(r2)
    full = live_original(fresh)
    assert all(torch.equal(incremental[k], full[k]) for k in full)


@pytest.mark.parametrize("arithmetic", ["fast", "comfy"])
def test_offload_equals_device(fam, pipe_of, arithmetic):
    recipe = recipe_for(fam, vocabulary="comfy", arithmetic=arithmetic).replace(
        unet_dtype="fp16", text_encoder_dtype="fp16")  # fp16 sources under fp32 live weights
    results = []
    for memory in ("device", "offload"):
        engine = MergeEngine(pipe_of(), recipe, memory=memory,
                             chunk_elements=4096)  # small chunks: exercise the streaming path
        assert engine.memory.mode == memory
        engine.apply(recipe)
        results.append(live_original(engine))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_fp16_engine_equals_fp16_checkpoint(fam, pipe_of, tmp_path):
    recipe = recipe_for(fam, vocabulary="mbw", arithmetic="fast")
    engine = MergeEngine(pipe_of(dtype=torch.float16), recipe)
    engine.apply(recipe)
    assert_engine_equals_file(engine, recipe, tmp_path, dtype="fp16")


def test_bad_recipes_fail_at_bind(fam, pipe_of, tiny_sd1, tiny_sdxl):
    recipe = recipe_for(fam, vocabulary="mbw")
    with pytest.raises(RecipeError, match="IN99"):
        MergeEngine(pipe_of(), recipe.replace(ratios={**recipe.ratios, "IN99": 0.5}))
    other = tiny_sdxl if fam.arch == "sd1" else tiny_sd1
    bad = recipe.replace(models={**recipe.models, "model2": Source(str(other.b))})
    with pytest.raises(IncompatibleSourcesError, match="same architecture"):
        MergeEngine(pipe_of(), bad)
    engine = MergeEngine(pipe_of(), recipe)
    with pytest.raises(RecipeError, match="new MergeEngine"):
        engine.apply(recipe.replace(arithmetic="fast"))


def test_memory_plan_refuses_what_does_not_fit():
    with pytest.raises(EngineMemoryError, match="will not fit"):
        plan_memory("device", torch.device("cpu"), 10**15, 0)
    plan = plan_memory("auto", torch.device("cpu"), 10**6, 10**5)
    assert plan.mode == "device" and "GiB" in plan.describe()


@pytest.mark.parametrize("multiplier,ratio", [(0.8, 0.3), (0.8, 1.0), (1.0, 0.0), (0.5, 0.6)])
def test_engine_add_difference_is_the_workflows_node_chain(fam, pipe_of, multiplier, ratio):
    recipe = Recipe(arch=fam.arch, method="add_difference", vocabulary="single",
                    ratios={"all": ratio}, multiplier=multiplier,
                    models={"model1": Source(str(fam.a)), "model2": Source(str(fam.b)),
                            "base": Source(str(fam.base))})
    engine = MergeEngine(pipe_of(), recipe, chunk_elements=4096)
    engine.apply(recipe)
    a, b, c = load_file(fam.a), load_file(fam.b), load_file(fam.base)
    live = live_original(engine)
    unet = [k for k in live if k.startswith("model.diffusion_model.")]
    assert len(unet) > 600
    bad = [k for k in unet
           if not torch.equal(live[k], comfyui_reference.add_difference(a[k], b[k], c[k],
                                                                   multiplier, ratio))]
    assert not bad, f"{len(bad)} of {len(unet)} UNet tensors differ, e.g. {bad[:3]}"
