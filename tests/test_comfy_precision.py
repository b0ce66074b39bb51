"""ComfyUI's default text-encoder precision: CLIPMerge* and a LoraLoader's clip strength on
text encoders held in fp16 (its default; ``--fp32-text-enc`` keeps fp32), in the file merge
and in the engine. Expected tensors come from ComfyUI's formulas in ``comfyui_reference``:
the weights rounded to fp16 when loaded, the patches applied in float32, the result rounded
to fp16 once; the UNet stays in float32 (ComfyUI on the CPU).
"""

from __future__ import annotations

import comfyui_reference as ref
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine import live_original

from merge_backend import ClipMerge, Recipe, Source, merge_to_file
from merge_backend.engine import MergeEngine
from merge_backend.pipeline import load_pipeline
from merge_backend.recipe import LoraSpec
from search import cli

UNET = "model.diffusion_model."
TEXT = ("cond_stage_model.", "conditioner.")
SKIP = (".position_ids", ".logit_scale")  # CLIPMerge* leave them alone
F16 = torch.float16


@pytest.fixture(params=["sd1", "sdxl"])
def fam(request, tiny_sd1, tiny_sdxl):
    return {"sd1": tiny_sd1, "sdxl": tiny_sdxl}[request.param]


def _strengths(clip: ClipMerge) -> tuple[float, float]:
    """(strength_model, strength_patch) of CLIPMergeSimple / Subtract / Add."""
    return {"weighted_sum": (clip.ratio, 1.0 - clip.ratio),
            "subtract": (clip.multiplier, -clip.multiplier), "add": (1.0, 1.0)}[clip.method]


CLIPS = [ClipMerge("weighted_sum", 0.3), ClipMerge("subtract", multiplier=0.7), ClipMerge("add")]


@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: c.method)
def test_clip_merges_on_fp16_text_encoders(fam, clip, tmp_path):
    recipe = Recipe(arch=fam.arch, method="weighted_sum", vocabulary="single",
                    ratios={"all": 0.4}, clip=clip, text_encoder_dtype="fp16",
                    models={"model1": Source(str(fam.a)), "model2": Source(str(fam.b))})
    out = merge_to_file(recipe, tmp_path / "m.safetensors", dtype="fp32").output
    got, a, b = load_file(out), load_file(fam.a), load_file(fam.b)
    te = [k for k in got if k.startswith(TEXT) and not k.endswith(SKIP)]
    unet = [k for k in got if k.startswith(UNET)]
    assert len(te) > 30 and len(unet) > 600
    expected = {k: ref.held(ref.patch(ref.held(a[k], F16), ref.held(b[k], F16), *_strengths(clip)),
                            F16) for k in te}
    expected.update({k: ref.patch(a[k], b[k], 0.4, 0.6) for k in unet})  # UNet: float32
    bad = [k for k in te + unet if not torch.equal(got[k], expected[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    # the fp32-held text encoders (the default) differ from ComfyUI's default in almost all
    fp32 = load_file(merge_to_file(recipe.replace(text_encoder_dtype="fp32"),
                                   tmp_path / "f.safetensors", dtype="fp32").output)
    assert sum(not torch.equal(fp32[k], got[k]) for k in te) > 0.8 * len(te)
    # and the engine writes the same values into a live fp32 pipeline
    engine = MergeEngine(load_pipeline(fam.a, config_folder=fam.config_folder), recipe,
                         chunk_elements=4096)
    engine.apply(recipe)
    live = live_original(engine)
    bad = [k for k in te + unet if k in live and not torch.equal(live[k], expected[k])]
    assert not bad and sum(k in live for k in te) > 30, f"engine: {bad[:3]}"


def _kohya_lora(fam, path, rank: int = 4) -> dict[str, tuple[str, int, torch.Tensor]]:
    """A hand-built kohya LoRA (alpha = rank) on a UNet layer and text-encoder layers.
    Returns file module name -> (original key, first row, up @ down as ComfyUI computes it)."""
    g = torch.Generator().manual_seed(7)
    if fam.arch == "sd1":
        modules = {"lora_unet_down_blocks_0_attentions_0_proj_in":
                   ("model.diffusion_model.input_blocks.1.1.proj_in.weight", 0, 0),
                   "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
                   ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"
                    ".weight", 0, 0),
                   "lora_te_text_model_encoder_layers_1_mlp_fc1":
                   ("cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight", 0, 0)}
    else:
        te2 = "conditioner.embedders.1.model.transformer.resblocks."
        modules = {"lora_unet_input_blocks_4_1_proj_in":
                   ("model.diffusion_model.input_blocks.4.1.proj_in.weight", 0, 0),
                   "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
                   ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn"
                    ".q_proj.weight", 0, 0),
                   # OpenCLIP keeps q/k/v in one in_proj_weight: v_proj is its last third
                   "lora_te2_text_model_encoder_layers_1_self_attn_v_proj":
                   (te2 + "1.attn.in_proj_weight", 2, 3),
                   "lora_te2_text_model_encoder_layers_2_mlp_fc1": (te2 + "2.mlp.c_fc.weight", 0, 0)}
    weights = load_file(fam.base)
    tensors, out = {}, {}
    for name, (key, part, parts) in modules.items():
        w = weights[key]
        rows = w.shape[0] // max(parts, 1)
        up = torch.randn(rows, rank, *([1] * (w.ndim - 2)), generator=g) * 0.1
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        tensors.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                        f"{name}.alpha": torch.tensor(float(rank))})
        diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1))
        out[name] = (key, part * rows, diff.reshape(rows, *w.shape[1:]))
    save_file(tensors, str(path))
    return out


def test_lora_clip_strength_on_fp16_text_encoders(fam, tmp_path):
    lora = tmp_path / "style.safetensors"
    modules = _kohya_lora(fam, lora)
    out = tmp_path / "styled.safetensors"
    assert cli.main(["lora", "apply", str(fam.a), f"{lora}:0.7", "--te-strength", "1.3",
                     "--text-encoder-dtype", "fp16", "--dtype", "fp32", "-o", str(out),
                     "--quiet"]) == 0
    got, a = load_file(out), load_file(fam.a)
    expected = {k: ref.held(v, F16) for k, v in a.items() if k.startswith(TEXT) and not k.endswith(SKIP)}
    expected.update({k: v for k, v in a.items() if k.startswith(UNET)})
    for key, row, diff in modules.values():
        # LoraLoader: weight += (strength * alpha / rank) * (up @ down), on the held weight
        strength = 0.7 if key.startswith(UNET) else 1.3
        w = expected[key].float().clone()
        w[row:row + diff.shape[0]] += (strength * 1.0) * diff
        expected[key] = ref.held(w, F16) if key.startswith(TEXT) else w
    bad = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    changed = [k for k in expected if not torch.equal(got[k], ref.held(a[k], F16))]
    assert {m[0] for m in modules.values()} <= set(changed)
    # the engine, with the same LoRA on model1's text encoders held in fp16
    recipe = Recipe(arch=fam.arch, method="weighted_sum", vocabulary="single", ratios={"all": 1.0},
                    models={"model1": Source(str(fam.a)), "model2": Source(str(fam.b))},
                    loras=(LoraSpec(str(lora), 0.7, te_strength=1.3),), text_encoder_dtype="fp16")
    engine = MergeEngine(load_pipeline(fam.a, config_folder=fam.config_folder), recipe)
    engine.apply(recipe)
    live = live_original(engine)
    bad = [k for k in expected if k in live and not torch.equal(live[k], expected[k])]
    assert not bad, f"engine: {len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.gpu
def test_engine_on_cuda_equals_the_file_for_exact_chains_and_held_precisions(fam, tmp_path):
    """The exact chain, fp16-held parts under fp32 live weights and a LoRA, streamed on CUDA."""
    lora = tmp_path / "style.safetensors"
    _kohya_lora(fam, lora)
    from merge_backend.recipe import uniform_ratios

    ratios = {k: round(0.1 + 0.8 * i / 40, 3) for i, k in
              enumerate(uniform_ratios(fam.arch, "comfy", 0))}
    recipe = Recipe(arch=fam.arch, method="add_difference", vocabulary="comfy", ratios=ratios,
                    multiplier=0.8, clip=ClipMerge("weighted_sum", 0.3), unet_dtype="fp16",
                    text_encoder_dtype="fp16", loras=(LoraSpec(str(lora), 0.7),),
                    models={"model1": Source(str(fam.a)), "model2": Source(str(fam.b)),
                            "base": Source(str(fam.base))})
    for arithmetic in ("comfy", "fast"):
        r = recipe.replace(arithmetic=arithmetic)
        pipe = load_pipeline(fam.a, config_folder=fam.config_folder, device="cuda")
        engine = MergeEngine(pipe, r, device="cuda", memory="offload", chunk_elements=4096)
        engine.apply(r)
        live = {k: v.cpu() for k, v in live_original(engine).items()}
        ref_file = load_file(merge_to_file(r, tmp_path / f"{arithmetic}.safetensors",
                                           dtype="fp32").output)
        bad = [k for k in live if k in ref_file and not torch.equal(live[k], ref_file[k])]
        assert not bad, f"{arithmetic}: {len(bad)} tensors differ, e.g. {bad[:3]}"
