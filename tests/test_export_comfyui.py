"""The exported ComfyUI workflow rebuilds the exported checkpoint, by ComfyUI's own formulas.

The evaluator (merge_backend.methods.comfyui_reference) is written from ComfyUI's node
definitions (REFERENCE §1), not from our merge code: a merge node clones model1 and patches
every ``diffusion_model.`` key of model2 with ``W = strength_model*W1 + strength_patch*W2`` in
float32; CLIPMerge* do the same on the text encoder, skipping ``position_ids`` /
``logit_scale``; LoraLoader adds its strengths times each LoRA delta; CheckpointSave keeps the
VAE of the loader it is wired to.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merge_backend import ClipMerge, Recipe, Source, merge_to_file
from merge_backend.checkpoint import open_checkpoint
from merge_backend.export import ComfyExportError, ComfyPrompt, comfy_workflow
from merge_backend.lora import random_lora, save_lora
from merge_backend.methods.comfyui_reference import evaluate_workflow
from merge_backend.recipe import LoraSpec

UNET = "model.diffusion_model."
TEXT = ("cond_stage_model.", "conditioner.", "text_encoders.")
VAE = ("first_stage_model.", "vae.")
SKIP = (".position_ids", ".logit_scale")

# ComfyUI's ModelMergeSD1 (= ModelMergeSD2) / SDXL slider names, in INPUT_TYPES order (written
# out here on purpose).
SD1_SLIDERS = (["time_embed.", "label_emb."] + [f"input_blocks.{i}." for i in range(12)]
               + [f"middle_block.{i}." for i in range(3)]
               + [f"output_blocks.{i}." for i in range(12)] + ["out."])
SDXL_SLIDERS = (["time_embed.", "label_emb."] + [f"input_blocks.{i}" for i in range(9)]
                + [f"middle_block.{i}" for i in range(3)]
                + [f"output_blocks.{i}" for i in range(9)] + ["out."])


# ---------------------------------------------------------------------------- recipes


def _ratios(names, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    return {n: round(float(v), 3) for n, v in zip(names, torch.rand(len(names), generator=g))}


def _recipe(fam, method: str, vocabulary: str, clip: ClipMerge | None, seed: int = 0) -> Recipe:
    from merge_backend.recipe import uniform_ratios

    models = {"model1": Source(str(fam.a)), "model2": Source(str(fam.b))}
    if method == "add_difference":
        models["base"] = Source(str(fam.base))
    ratios = {}
    if method in ("weighted_sum", "add_difference"):
        ratios = _ratios(uniform_ratios(fam.arch, vocabulary, 0), seed)
    return Recipe(arch=fam.arch, method=method, models=models, vocabulary=vocabulary,
                  ratios=ratios, multiplier=0.7, clip=clip)


CASES = [
    ("sd1", "weighted_sum", "comfy", ClipMerge("weighted_sum", 0.3)),
    ("sdxl", "add_difference", "comfy", ClipMerge("subtract", multiplier=0.8)),
    ("sd1", "weighted_sum", "mbw", None),  # BASE merges the text encoder (CLIPMergeSimple)
    ("sd1", "weighted_sum", "blocks", ClipMerge("subtract", multiplier=0.5)),
    ("sd1", "subtract", "single", ClipMerge("add")),  # (ModelMergeAdd: in add_difference)
    ("sd1", "add_difference", "comfy", None),
    ("sdxl", "weighted_sum", "mbw", None),  # BASE -> CLIPMergeSimple over both encoders
    ("sd2", "weighted_sum", "comfy", ClipMerge("weighted_sum", 0.3)),  # ModelMergeSD2
    ("sd2", "weighted_sum", "mbw", None),
    ("sd2", "add_difference", "blocks", None),
]


@pytest.fixture
def fams(tiny_sd1, tiny_sd2, tiny_sdxl):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}


@pytest.mark.parametrize("arch,method,vocabulary,clip", CASES)
def test_workflow_rebuilds_the_checkpoint(arch, method, vocabulary, clip, fams, tmp_path):
    fam = fams[arch]
    recipe = _recipe(fam, method, vocabulary, clip)
    out = tmp_path / "merged.safetensors"
    merge_to_file(recipe, out, dtype="fp32")
    api = comfy_workflow(recipe).api()
    files = {p.name: p for p in (fam.a, fam.b, fam.base)}
    rebuilt = evaluate_workflow(api, files)
    exported = load_file(str(out))
    keys = [k for k in exported if k.startswith((UNET, *VAE) + TEXT) and not k.endswith(SKIP)]
    assert len(keys) > 600 and set(keys) <= set(rebuilt)
    assert not [k for k in rebuilt if k.startswith(UNET) and k not in exported]
    differ = [k for k in keys if not torch.equal(rebuilt[k].to(exported[k].dtype), exported[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    model1 = load_file(str(fam.a))
    merged_te = [k for k in keys if k.startswith(TEXT) and not torch.equal(exported[k], model1[k])]
    assert bool(merged_te) == (recipe.effective_clip() is not None)


def test_node_names_and_widgets_are_comfyuis(tiny_sd1, tiny_sd2, tiny_sdxl):
    for fam, sliders, node in ((tiny_sd1, SD1_SLIDERS, "ModelMergeSD1"),
                               (tiny_sd2, SD1_SLIDERS, "ModelMergeSD2"),
                               (tiny_sdxl, SDXL_SLIDERS, "ModelMergeSDXL")):
        recipe = _recipe(fam, "add_difference", "mbw", None)
        api = comfy_workflow(recipe).api()
        kinds = [n["class_type"] for n in api.values()]
        assert kinds[:6] == ["CheckpointLoaderSimple"] * 3 + ["ModelMergeSubtract",
                                                               "ModelMergeAdd", node]
        blend = api["6"]["inputs"]
        assert list(blend) == ["model1", "model2", *sliders]
        assert blend["model1"] == ["1", 0] and blend["model2"] == ["5", 0]
        # IN04 of the mbw recipe lands on input_blocks.4 and out. takes the last OUT's ratio.
        dot = "" if fam.arch == "sdxl" else "."
        assert blend[f"input_blocks.4{dot}"] == recipe.ratios["IN04"]
        assert blend["out."] == recipe.ratios["OUT08" if fam.arch == "sdxl" else "OUT11"]
        assert blend["time_embed."] == blend["label_emb."] == recipe.ratios["IN00"]
        assert api["4"]["inputs"] == {"model1": ["2", 0], "model2": ["3", 0], "multiplier": 0.7}


def test_ui_format_agrees_with_api_format(tiny_sd1):
    recipe = _recipe(tiny_sd1, "weighted_sum", "comfy", ClipMerge("weighted_sum", 0.3))
    prompt = ComfyPrompt("a red apple", negative="blurry", seed=7, steps=4, cfg=5.0,
                         width=64, height=64, sampler_name="euler_ancestral")
    wf = comfy_workflow(recipe, prompt=prompt, name="trial7")
    api, ui = wf.api(), wf.ui()
    assert ui["version"] == 0.4 and ui["last_node_id"] == len(ui["nodes"]) == len(api)
    assert ui["extra"]["mergesearch"]["recipe"] == recipe.to_dict()
    by_id = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, slot, dst, dst_slot, kind in ui["links"]:
        target = by_id[dst]["inputs"][dst_slot]
        assert target["link"] == link_id and target["type"] == kind
        assert api[str(dst)]["inputs"][target["name"]] == [str(src), slot]
        assert link_id in by_id[src]["outputs"][slot]["links"]
    for node in ui["nodes"]:
        widgets = [v for v in api[str(node["id"])]["inputs"].values() if not isinstance(v, list)]
        values = list(node["widgets_values"])
        if node["type"] == "KSampler":
            assert values.pop(1) == "fixed"  # the editor's control_after_generate
        assert values == widgets, node["type"]
    sampler = next(n for n in api.values() if n["class_type"] == "KSampler")["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"],
            sampler["scheduler"], sampler["denoise"]) == (7, 4, 5.0, "euler_ancestral", "normal", 1.0)
    texts = {n["inputs"]["text"] for n in api.values() if n["class_type"] == "CLIPTextEncode"}
    assert texts == {"a red apple", "blurry"}
    save = next(n for n in api.values() if n["class_type"] == "CheckpointSave")["inputs"]
    assert save["filename_prefix"] == "checkpoints/trial7"
    clip_node = api[save["clip"][0]]
    assert clip_node == {"class_type": "CLIPMergeSimple", "_meta": clip_node["_meta"],
                         "inputs": {"clip1": ["1", 1], "clip2": ["2", 1], "ratio": 0.3}}


def test_workflow_refuses_what_comfyui_sliders_cannot_hold(tiny_sd1):
    recipe = _recipe(tiny_sd1, "weighted_sum", "single", None)
    past = recipe.replace(ratios={"all": 1.5}, allow_extrapolation=True)
    with pytest.raises(ComfyExportError, match=r"recipe.ratios.*\[0, 1\]"):
        comfy_workflow(past)
    far = _recipe(tiny_sd1, "subtract", "single", None).replace(multiplier=12.0)
    with pytest.raises(ComfyExportError, match="recipe.multiplier = 12.0"):
        comfy_workflow(far)


def _with_loras(fam, recipe: Recipe, tmp_path, *strengths: tuple[float, float | None]) -> Recipe:
    base = open_checkpoint(fam.base)
    components = ("unet", "te1", "te2") if fam.arch == "sdxl" else ("unet", "te")
    specs = []
    for i, (strength, te_strength) in enumerate(strengths):
        lora = random_lora(base, rank=3, components=components, vary_alpha=True, every=2 + i,
                           seed=20 + i)
        path = save_lora(lora, tmp_path / f"lora{i}.safetensors", dtype=torch.float32)
        specs.append(LoraSpec(str(path), strength, None, te_strength))
    return recipe.replace(loras=tuple(specs))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_workflow_with_loras_rebuilds_the_checkpoint(arch, fams, tmp_path):
    fam = fams[arch]
    recipe = _with_loras(fam, _recipe(fam, "weighted_sum", "mbw", None), tmp_path,
                         (0.8, None), (-0.6, 1.3))
    out = tmp_path / "merged.safetensors"
    merge_to_file(recipe, out, dtype="fp32")
    api = comfy_workflow(recipe).api()
    loaders = [n["inputs"] for n in api.values() if n["class_type"] == "LoraLoader"]
    assert [(n["lora_name"], n["strength_model"], n["strength_clip"]) for n in loaders] == [
        ("lora0.safetensors", 0.8, 0.8), ("lora1.safetensors", -0.6, 1.3)]
    save = next(n for n in api.values() if n["class_type"] == "CheckpointSave")["inputs"]
    sampler = next(n for n in api.values() if n["class_type"] == "KSampler")["inputs"]
    last = [i for i, n in api.items() if n["class_type"] == "LoraLoader"][-1]
    assert save["model"] == sampler["model"] == [last, 0] and save["clip"] == [last, 1]
    files = {p.name: p for p in (fam.a, fam.b, fam.base)}
    files.update({Path(spec.path).name: Path(spec.path) for spec in recipe.loras})
    rebuilt = evaluate_workflow(api, files)
    exported = load_file(str(out))
    plain = load_file(str(merge_to_file(recipe.replace(loras=()), tmp_path / "plain.safetensors",
                                        dtype="fp32").output))
    keys = [k for k in exported if k.startswith((UNET, *VAE) + TEXT) and not k.endswith(SKIP)]
    changed = [k for k in keys if not torch.equal(exported[k], plain[k])]
    assert any(k.startswith(UNET) for k in changed) and any(k.startswith(TEXT) for k in changed)
    # ComfyUI adds one LoRA after the other, mergesearch their sum: float32 rounding apart.
    worst = max((rebuilt[k].float() - exported[k]).abs().max().item() for k in keys)
    assert worst < 1e-6


def test_workflow_refuses_loras_loraloader_cannot_hold(tiny_sd1, tmp_path):
    recipe = _with_loras(tiny_sd1, _recipe(tiny_sd1, "weighted_sum", "mbw", None), tmp_path,
                         (1.0, None))
    spec = recipe.loras[0]
    with pytest.raises(ComfyExportError, match=r"recipe.loras\[0\].block_strengths"):
        comfy_workflow(recipe.replace(loras=(LoraSpec(spec.path, 1.0, {"IN04": 0.5}),)))
    comfy_workflow(recipe.replace(loras=(LoraSpec(spec.path, 1.0, {"IN04": 1.0}),)))  # all 1.0
    with pytest.raises(ComfyExportError, match=r"recipe.loras\[0\].te_strength = 150"):
        comfy_workflow(recipe.replace(loras=(LoraSpec(spec.path, 1.0, None, 150.0),)))
    other = tmp_path / "elsewhere"
    other.mkdir()
    twin = other / Path(spec.path).name
    twin.write_bytes(Path(spec.path).read_bytes())
    with pytest.raises(ComfyExportError, match="LoRAs share a file name"):
        comfy_workflow(recipe.replace(loras=(spec, LoraSpec(str(twin)))))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_workflow_rebuilds_the_checkpoint_held_in_fp16(arch, tiny_sd1, tiny_sdxl, tmp_path):
    """ComfyUI on a GPU (UNet in fp16) with its default fp16 text encoders."""
    fam = {"sd1": tiny_sd1, "sdxl": tiny_sdxl}[arch]
    recipe = _recipe(fam, "add_difference", "comfy", ClipMerge("weighted_sum", 0.3)).replace(
        unet_dtype="fp16", text_encoder_dtype="fp16")
    out = merge_to_file(recipe, tmp_path / "merged.safetensors", dtype="fp32").output
    wf = comfy_workflow(recipe)
    assert "--fp16-unet --fp16-text-enc" in wf.ui()["extra"]["mergesearch"]["settings"]
    files = {p.name: p for p in (fam.a, fam.b, fam.base)}
    rebuilt = evaluate_workflow(wf.api(), files, unet=torch.float16, clip=torch.float16)
    exported = load_file(str(out))
    keys = [k for k in exported if k.startswith((UNET, *VAE) + TEXT)]
    assert len(keys) > 600
    differ = [k for k in keys if not torch.equal(rebuilt[k].to(exported[k].dtype), exported[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    # the same workflow on float32-held weights is another file
    fp32 = evaluate_workflow(wf.api(), files)
    assert sum(not torch.equal(fp32[k], exported[k]) for k in keys if k.startswith(UNET)) > 300
