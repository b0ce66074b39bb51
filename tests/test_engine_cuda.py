"""The engine's CUDA staging paths: ``memory: offload`` (sources in pinned host memory, chunks
copied on a side stream into two staging slots while the other slot computes) and sources
held in another precision than the live weights (the Recipe's ``unet_dtype``: fp16-held
sources computed into fp32 weights, rounded to fp16 as ComfyUI holding fp16 does).

Expected values are built independently: the file merge on the CPU for the ComfyUI-exact
arithmetic (plain IEEE multiplies and adds, the same bits on any device), the formula written
out on the same GPU for the fast arithmetic (``torch.lerp`` may fuse differently on a CPU),
and, for the streamed paths, the same engine with its sources resident on the GPU. Small
chunks make each block stream through many chunks, so both slots and their events are
reused many times within one apply. All skip without CUDA.
"""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from test_engine import live_original

from merge_backend import merge_to_file, open_checkpoint
from merge_backend.dtypes import NAMES
from merge_backend.engine import MergeEngine
from merge_backend.lora import random_lora, save_lora
from merge_backend.pipeline import load_pipeline
from merge_backend.recipe import LoraSpec, Recipe, Source, uniform_ratios

pytestmark = pytest.mark.gpu
CHUNK = 4096  # elements: blocks of the tiny models stream through dozens of chunks
UNET = "model.diffusion_model."


@pytest.fixture(params=["sd1", "sdxl"])
def fam(request, tiny_sd1, tiny_sdxl):
    return {"sd1": tiny_sd1, "sdxl": tiny_sdxl}[request.param]


def _recipe(fam, arithmetic: str, ratio: float = 0.3, vocabulary: str = "single",
            method: str = "weighted_sum") -> Recipe:
    models = {"model1": Source(str(fam.a)), "model2": Source(str(fam.b))}
    if method == "add_difference":
        models["base"] = Source(str(fam.base))
    return Recipe(arch=fam.arch, method=method, vocabulary=vocabulary, models=models,
                  ratios=uniform_ratios(fam.arch, vocabulary, ratio), arithmetic=arithmetic,
                  multiplier=0.8)


def _engine(fam, recipe, memory, live=torch.float32, source=None):
    """``source``: the precision the Recipe holds the sources in (default: the live dtype)."""
    held = NAMES[source or live]
    pipe = load_pipeline(fam.a, config_folder=fam.config_folder, device="cuda", dtype=live)
    return MergeEngine(pipe, recipe.replace(unet_dtype=held, text_encoder_dtype=held),
                       device="cuda", memory=memory, chunk_elements=CHUNK)


def _unet(engine) -> dict[str, torch.Tensor]:
    return {k: v for k, v in live_original(engine).items() if k.startswith(UNET)}


def _assert_equal(live: dict, expected: dict) -> None:
    assert len(live) > 300
    bad = [k for k, v in live.items() if not torch.equal(v, expected[k].to(v))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def test_offload_keeps_sources_in_pinned_host_memory_and_stages_on_the_gpu(fam):
    engine = _engine(fam, _recipe(fam, "fast"), "offload")
    assert engine.memory.mode == "offload"
    for group in engine.groups:
        for role, source in group.sources.items():
            assert source.device.type == "cpu" and source.is_pinned(), (group.name, role)
        assert group.live.device.type == "cuda"
    staging = [b for slot in engine.runner._stage for b in slot]
    assert len(staging) == 2 * 2 and all(b.device.type == "cuda" for b in staging)


@pytest.mark.parametrize("method", ["weighted_sum", "add_difference"])
@pytest.mark.parametrize("live,dtype", [(torch.float32, "fp32"), (torch.float16, "fp16")])
def test_offload_exact_arithmetic_equals_the_file_merge(fam, tmp_path, method, live, dtype):
    # fp32 sources (as the files hold them) into fp32 or fp16 weights, as the file merge does
    recipe = _recipe(fam, "comfy", vocabulary="comfy", method=method)
    engine = _engine(fam, recipe, "offload", live=live, source=torch.float32)
    recipe = engine.bound
    engine.apply(recipe.replace(ratios=uniform_ratios(fam.arch, "comfy", 0.9)))  # another first
    engine.apply(recipe)
    merge_to_file(recipe, tmp_path / "ref.safetensors", dtype=dtype)
    _assert_equal(_unet(engine), load_file(tmp_path / "ref.safetensors"))


@pytest.mark.parametrize("memory", ["offload", "device"])
@pytest.mark.parametrize("arithmetic", ["fast", "comfy"])
def test_fp16_sources_staged_into_fp32_weights_equal_the_formula(fam, memory, arithmetic):
    # fp16-held sources never match the fp32 live dtype, so both memory modes copy every chunk
    # into float32 scratch (offload from pinned host memory, device mode from fp16 copies on the
    # GPU) and round the result to fp16 before it is stored.
    ratio = 0.3
    engine = _engine(fam, _recipe(fam, arithmetic, ratio), memory, source=torch.float16)
    held = {"unet_dtype": "fp16", "text_encoder_dtype": "fp16"}
    engine.apply(_recipe(fam, arithmetic, 0.8).replace(**held))
    engine.apply(_recipe(fam, arithmetic, ratio).replace(**held))
    a, b = load_file(fam.a, device="cuda"), load_file(fam.b, device="cuda")
    expected = {}
    for key in (k for k in a if k.startswith(UNET)):
        w1, w2 = a[key].half().float(), b[key].half().float()  # what the engine holds
        if arithmetic == "fast":
            expected[key] = torch.lerp(w2, w1, ratio).half()
        else:  # ComfyUI: w = W1.float(); w *= r; w += (1 - r) * W2.float(), held in fp16
            expected[key] = (w1 * ratio + w2 * (1.0 - ratio)).half()
    _assert_equal(_unet(engine), expected)


@pytest.mark.parametrize("live", [torch.float32, torch.float16])
def test_offload_fast_arithmetic_equals_sources_resident_on_the_gpu(fam, live):
    recipe = _recipe(fam, "fast", vocabulary="mbw")
    results = []
    for memory in ("device", "offload"):  # device: one lerp per block; offload: streamed
        engine = _engine(fam, recipe, memory, live=live)
        engine.apply(engine.bound)
        results.append(_unet(engine))
    _assert_equal(results[1], results[0])


def test_offload_with_loras_equals_sources_resident_on_the_gpu_and_the_file(fam, tmp_path):
    ckpt = open_checkpoint(fam.base)
    lora = random_lora(ckpt, rank=4, seed=1, components=("unet",), every=2, scale=0.2)
    path = save_lora(lora, tmp_path / "l.safetensors", dtype=torch.float32)
    spec = LoraSpec(str(path), 0.7, {"IN04": 0.0, "OUT02": 1.5})
    recipe = _recipe(fam, "comfy", 0.35, vocabulary="mbw").replace(loras=(spec,))
    results = []
    for memory in ("device", "offload"):
        engine = _engine(fam, recipe, memory)
        engine.apply(engine.bound.replace(loras=(replace(spec, strength=0.1),)))
        engine.apply(engine.bound)
        results.append(_unet(engine))
    _assert_equal(results[1], results[0])
    merge_to_file(recipe, tmp_path / "ref.safetensors", dtype="fp32")
    ref = load_file(tmp_path / "ref.safetensors")
    # LoRA terms are sums of products, which a GPU may fuse: within float32 round-off.
    for key, value in results[1].items():
        torch.testing.assert_close(value.cpu(), ref[key], rtol=1e-6, atol=1e-7)


def test_many_applies_in_a_row_never_read_a_slot_being_refilled(fam):
    # Alternating candidates: any race between the copy stream and the compute stream would
    # leave some chunk holding the previous candidate's values.
    results = {}
    engine = _engine(fam, _recipe(fam, "fast", vocabulary="mbw"), "offload")
    for i in range(6):
        ratio = (0.2, 0.7)[i % 2]
        engine.apply(_recipe(fam, "fast", ratio, vocabulary="mbw"))
        live = _unet(engine)
        if ratio in results:
            _assert_equal(live, results[ratio])
        results[ratio] = live
    reference = _engine(fam, _recipe(fam, "fast", vocabulary="mbw"), "device")
    reference.apply(_recipe(fam, "fast", 0.7, vocabulary="mbw"))
    _assert_equal(results[0.7], _unet(reference))
