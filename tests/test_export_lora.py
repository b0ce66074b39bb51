"""`mergesearch export … --to lora --base FILE`: the best merge as a difference LoRA."""

import torch
from safetensors.torch import load_file

from merge_backend import Recipe, Source
from merge_backend.lora import LoraUse, lora_deltas_for_key, read_lora
from merge_backend.recipe import uniform_ratios
from search.cli import main


def test_export_best_merge_as_difference_lora(tiny_sd1, tmp_path, capsys):
    recipe = Recipe(arch="sd1", method="weighted_sum", vocabulary="mbw",
                    ratios=uniform_ratios("sd1", "mbw", 0.4),
                    models={"model1": Source(str(tiny_sd1.a)), "model2": Source(str(tiny_sd1.b))})
    path = tmp_path / "best.json"
    path.write_text(recipe.to_json())
    out = tmp_path / "out"
    assert main(["export", str(path), "--to", "lora", "--to", "checkpoint", "--base",
                 str(tiny_sd1.base), "--rank", "512", "--dtype", "fp32", "-o", str(out)]) == 0
    lora_path = out / "best.lora.safetensors"
    merged, base = load_file(out / "best.safetensors"), load_file(tiny_sd1.base)
    uses = [LoraUse(read_lora(lora_path, "sd1"), 1.0)]
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    delta = lora_deltas_for_key(uses, key, merged[key].shape)
    want = merged[key] - base[key]
    # full rank, no clamp by default: exact but for the fp16 factors' rounding
    assert torch.linalg.norm(delta - want) / torch.linalg.norm(want) < 1e-3
    assert not [k for k in load_file(lora_path) if k.endswith((".diff", ".diff_b"))]
    # in ComfyUI's layout, with LoraSave's bias and norm differences
    assert main(["export", str(path), "--to", "lora", "--base", str(tiny_sd1.base), "--rank", "8",
                 "--lora-format", "comfyui", "-o", str(tmp_path / "c.safetensors")]) == 0
    keys = load_file(tmp_path / "c.safetensors")
    assert "diffusion_model.input_blocks.4.1.proj_in.diff_b" in keys
    assert any(k.startswith("text_encoders.clip_l.") for k in keys)


def test_export_lora_needs_base(tiny_sd1, tmp_path, capsys):
    recipe = Recipe(arch="sd1", method="weighted_sum", vocabulary="single", ratios={"all": 0.5},
                    models={"model1": Source(str(tiny_sd1.a)), "model2": Source(str(tiny_sd1.b))})
    path = tmp_path / "r.json"
    path.write_text(recipe.to_json())
    assert main(["export", str(path), "--to", "lora", "-o", str(tmp_path / "o")]) == 1
    assert "--base" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_export_recipe_with_loras_to_comfyui_and_not_to_mbw(tiny_sd1, tmp_path, capsys):
    import json

    from merge_backend.checkpoint import open_checkpoint
    from merge_backend.lora import random_lora, save_lora
    from merge_backend.recipe import LoraSpec

    lora = save_lora(random_lora(open_checkpoint(tiny_sd1.base), rank=2, seed=3),
                     tmp_path / "style.safetensors")
    recipe = Recipe(arch="sd1", method="weighted_sum", vocabulary="mbw",
                    ratios=uniform_ratios("sd1", "mbw", 0.4), loras=(LoraSpec(str(lora), 0.7),),
                    models={"model1": Source(str(tiny_sd1.a)), "model2": Source(str(tiny_sd1.b))})
    path = tmp_path / "best.json"
    path.write_text(recipe.to_json())
    out = tmp_path / "out"
    assert main(["export", str(path), "--to", "mbw", "--to", "comfyui", "-o", str(out)]) == 1
    assert "recipe.loras" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(path), "--to", "comfyui", "-o", str(out), "--quiet"]) == 0
    api = json.loads(next(out.glob("*api*.json")).read_text())
    loaders = [n["inputs"] for n in api.values() if n["class_type"] == "LoraLoader"]
    assert [(n["lora_name"], n["strength_model"]) for n in loaders] == [("style.safetensors", 0.7)]
