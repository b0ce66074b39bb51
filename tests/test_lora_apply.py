"""Applying and adding LoRAs: our arithmetic agrees with diffusers' on the files we write,
apply -> extract -> apply round trips, adding LoRAs equals applying them all, and the
per-block / text-encoder strengths and pipeline undo do what they say."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from merge_backend.checkpoint import open_checkpoint
from merge_backend.lora import (
    LoraError,
    LoraUse,
    add_loras,
    apply_to_pipeline,
    extract_lora,
    lora_deltas_for_key,
    name_table,
    random_lora,
    read_lora,
    save_lora,
)
from merge_backend.merge_file import apply_to_file
from merge_backend.pipeline import load_pipeline
from merge_backend.recipe import LoraSpec


def _components(fam):
    return ("unet", *(te.name for te in open_checkpoint(fam.base).arch.text_encoders))


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _diffusers_fuse_matches_ours(fam, path, strength):
    ours = load_pipeline(fam.base, config_folder=fam.config_folder)
    changed = apply_to_pipeline(ours, [(read_lora(path), strength)])
    theirs = load_pipeline(fam.base, config_folder=fam.config_folder)
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora(lora_scale=strength)
    theirs.unload_lora_weights()
    base = load_pipeline(fam.base, config_folder=fam.config_folder)
    assert changed > 100
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(ours, name, None) is None:
            continue
        mine, other = _state(getattr(ours, name)), _state(getattr(theirs, name))
        orig = _state(getattr(base, name))
        assert any(not torch.equal(mine[k], orig[k]) for k in mine), name
        for key in mine:
            torch.testing.assert_close(other[key], mine[key], rtol=1e-5, atol=1e-6,
                                       msg=f"{name} {key}")


def test_diffusers_fuses_our_extracted_kohya_file_like_our_apply(tmp_path, tiny_sd1):
    # rank 48 exceeds some layers' width (32): they get r = 32 under the one shared alpha
    path = tmp_path / "x.safetensors"
    extract_lora(tiny_sd1.a, tiny_sd1.base, path, rank=48, text_encoder=True)
    _diffusers_fuse_matches_ours(tiny_sd1, path, 0.7)


def test_diffusers_fuses_our_sdxl_kohya_file_like_our_apply(tmp_path, tiny_sdxl):
    # modules with different alphas and ranks, folded into one alpha when written;
    # text encoder 2 stores q/k/v as one tensor and text_projection transposed
    lora = random_lora(open_checkpoint(tiny_sdxl.base), rank=48, components=_components(tiny_sdxl),
                       vary_alpha=True, seed=7)
    path = save_lora(lora, tmp_path / "xl.safetensors")
    _diffusers_fuse_matches_ours(tiny_sdxl, path, 1.3)


def test_diffusers_fuses_our_sd2_kohya_file_like_our_apply(tmp_path, tiny_sd2):
    # the OpenCLIP-H text encoder: our q/k/v chunks of in_proj_weight are diffusers' q/k/v_proj
    path = tmp_path / "sd2.safetensors"
    lora = random_lora(open_checkpoint(tiny_sd2.base), rank=4, components=_components(tiny_sd2),
                       every=2, seed=5)
    # the file's last OpenCLIP layer is not in the pipeline (SD2 conditions on the penultimate):
    # a LoRA trained on the pipeline never touches it
    lora.modules = {s: m for s, m in lora.modules.items() if ".resblocks.2." not in m.target.key}
    save_lora(lora, path, dtype=torch.float32)
    _diffusers_fuse_matches_ours(tiny_sd2, path, 0.9)


def test_lora_applies_to_an_sd2_file(tmp_path, tiny_sd2):
    """apply_to_file on SD2: each changed weight is base + strength · up @ down · alpha / r,
    written out here per kohya module; q/k/v land in their thirds of OpenCLIP's in_proj."""
    base = open_checkpoint(tiny_sd2.base)
    lora = random_lora(base, rank=3, components=("unet", "te"), every=4, seed=6)
    path = save_lora(lora, tmp_path / "l.safetensors", dtype=torch.float32)
    out = tmp_path / "applied.safetensors"
    result = apply_to_file(tiny_sd2.base, [LoraSpec(str(path), 0.5)], out, dtype="fp32")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    table = name_table("sd2")
    expected: dict[str, torch.Tensor] = {}
    for name in {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_up.weight")}:
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        delta = (up.flatten(1) @ down.flatten(1)) * float(tensors[f"{name}.alpha"]) / up.shape[1]
        target = table.resolve(name)
        weight = expected.setdefault(target.key, base.get(target.key).float().clone())
        rows = weight.shape[0] // target.parts
        part = weight[target.index * rows:(target.index + 1) * rows]
        part += 0.5 * delta.reshape(part.shape)
    applied = open_checkpoint(out)
    assert result.lora_changed == len(expected) > 10
    assert any(k.startswith("cond_stage_model.model.") and "in_proj" in k for k in expected)
    for key, value in expected.items():
        torch.testing.assert_close(applied.get(key), value, rtol=0, atol=1e-6, msg=key)


def test_apply_extract_apply_round_trips(tmp_path, tiny_sd1):
    base = open_checkpoint(tiny_sd1.base)
    lora = random_lora(base, rank=4, components=("unet", "te"), vary_alpha=True, seed=3)
    first = save_lora(lora, tmp_path / "first.safetensors", dtype=torch.float32)
    applied = tmp_path / "applied.safetensors"
    apply_to_file(tiny_sd1.base, [LoraSpec(str(first))], applied, dtype="fp32")
    again = tmp_path / "again.safetensors"
    result = extract_lora(applied, tiny_sd1.base, again, rank=4, clamp=None, dtype="fp32",
                          text_encoder=True)
    assert result.table.overall < 1e-4  # a rank-4 difference is captured at rank 4
    reapplied = tmp_path / "reapplied.safetensors"
    apply_to_file(tiny_sd1.base, [LoraSpec(str(again))], reapplied, dtype="fp32")
    one, two = open_checkpoint(applied), open_checkpoint(reapplied)
    assert one.keys() == two.keys()
    for key in one.keys():
        torch.testing.assert_close(two.get(key), one.get(key), rtol=1e-4, atol=1e-5, msg=key)
    with safe_open(str(applied), "pt") as f:
        recipe = json.loads(f.metadata()["mergesearch.recipe"])
    assert recipe["loras"][0]["path"] == str(first) and len(recipe["loras"][0]["sha256"]) == 64


def test_adding_loras_exactly_equals_applying_both(tmp_path, tiny_sdxl):
    base = open_checkpoint(tiny_sdxl.base)
    one = random_lora(base, rank=3, components=("unet", "te2"), vary_alpha=True, every=3, seed=4)
    two = random_lora(base, rank=5, components=("unet", "te1"), every=2, alpha=1.0, seed=5)
    uses = [LoraUse(one, 0.8), LoraUse(two, -0.5)]
    merged, table = add_loras(uses)
    assert table is None
    path = save_lora(merged, tmp_path / "sum.safetensors", dtype=torch.float32)
    summed = [LoraUse(read_lora(path))]
    keys = set(uses[0].keys()) | set(uses[1].keys())
    assert set(summed[0].keys()) == keys
    for key in keys:
        want = lora_deltas_for_key(uses, key, base.shape(key))
        torch.testing.assert_close(lora_deltas_for_key(summed, key, base.shape(key)), want,
                                   rtol=1e-5, atol=1e-6, msg=key)
    # resized to one rank the error is what an extraction would report
    small, errors = add_loras(uses, rank=4)
    assert 0 < errors.overall < 1 and max(m.rank for m in small.modules.values()) == 4


def test_block_and_text_encoder_strengths(tmp_path, tiny_sd1):
    base = open_checkpoint(tiny_sd1.base)
    lora_path = save_lora(random_lora(base, rank=2, components=("unet", "te"), seed=6),
                          tmp_path / "l.safetensors")
    out = tmp_path / "blocks.safetensors"
    spec = LoraSpec(str(lora_path), 1.0, {"IN04": 0.0, "OUT03": 2.0}, te_strength=0.0)
    result = apply_to_file(tiny_sd1.base, [spec], out, dtype="fp32")
    made = open_checkpoint(out)
    use = LoraUse(read_lora(lora_path))
    unchanged = [k for k in use.keys() if "input_blocks.4." in k or k.startswith("cond_stage_model")]
    doubled = [k for k in use.keys() if "output_blocks.3." in k]
    assert unchanged and doubled
    assert result.lora_changed == len(set(use.keys()) - set(unchanged))
    for key in unchanged:
        assert torch.equal(made.get(key), base.get(key).float()), key
    for key in doubled:
        delta = lora_deltas_for_key([use], key, base.shape(key))
        torch.testing.assert_close(made.get(key) - base.get(key).float(), 2 * delta,
                                   rtol=1e-4, atol=1e-6)
    untouched = [k for k in base.keys() if k not in use.keys() and base.dtype(k).is_floating_point
                 and not k.endswith("position_ids")]
    for key in untouched:  # the checkpoint merged with itself at 1.0 is the checkpoint
        assert torch.equal(made.get(key), base.get(key).float()), key
    lora_before = lora_path.read_bytes()
    with pytest.raises(ValueError, match="is one of the LoRAs"):
        apply_to_file(tiny_sd1.base, [spec], lora_path, dtype="fp32", overwrite=True)
    assert lora_path.read_bytes() == lora_before


def test_pipeline_apply_then_subtract_restores_the_weights(tiny_sdxl):
    pipe = load_pipeline(tiny_sdxl.base, config_folder=tiny_sdxl.config_folder)
    before = {n: _state(getattr(pipe, n)) for n in ("unet", "text_encoder_2")}
    ptr = pipe.unet.conv_in.weight.data_ptr()
    lora = random_lora(open_checkpoint(tiny_sdxl.base), rank=4, components=("unet", "te2"))
    apply_to_pipeline(pipe, [(lora, 1.0)])
    assert not torch.equal(pipe.unet.conv_in.weight, before["unet"]["conv_in.weight"])
    apply_to_pipeline(pipe, [(lora, 1.0)], sign=-1.0)
    assert pipe.unet.conv_in.weight.data_ptr() == ptr  # in place: engine buffers stay valid
    for name, state in before.items():
        for key, value in _state(getattr(pipe, name)).items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=1e-6)


def test_lora_for_another_architecture_in_a_pipeline(tiny_sd1, tiny_sdxl):
    pipe = load_pipeline(tiny_sd1.base, config_folder=tiny_sd1.config_folder)
    xl = random_lora(open_checkpoint(tiny_sdxl.base), rank=2, every=5)
    state = _state(pipe.unet)
    with pytest.raises(LoraError, match="no parameter for .* key"):
        apply_to_pipeline(pipe, [(xl, 1.0)], arch="sd1")
    assert all(torch.equal(v, state[k]) for k, v in _state(pipe.unet).items())
