"""Extraction: full rank reproduces model1 - model2, rank r loses exactly the SVD tail, and the
files have ComfyUI's / kohya's layout."""

from __future__ import annotations

import math

import comfyui_reference
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge_backend.checkpoint import open_checkpoint
from merge_backend.lora import (
    LoraError,
    LoraUse,
    extract_lora,
    layer_errors,
    lora_deltas_for_key,
    name_table,
    read_lora,
)
from merge_backend.lora.svd import as_matrix, clamp_factors, factorize, threads_for


def _differences(fam):
    """Original key -> float32 finetune_a - base of every LoRA-able UNet weight."""
    a, b = open_checkpoint(fam.a), open_checkpoint(fam.base)
    keys = {t.key for t in name_table(fam.arch).components(["unet"]) if t.lora_able and t.key in b}
    return {k: a.get(k).float() - b.get(k).float() for k in keys}


def _relative_error(fam, path):
    """||Δ - LoRA|| / ||Δ|| over the keys the LoRA file changes, read back from the file."""
    lora = read_lora(path)
    use = LoraUse(lora)
    base, a = open_checkpoint(fam.base), open_checkpoint(fam.a)
    err = norm = 0.0
    for key in use.keys():
        diff = a.get(key).float() - base.get(key).float()
        got = lora_deltas_for_key([use], key, diff.shape)
        err += (diff - got).double().pow(2).sum().item()
        norm += diff.double().pow(2).sum().item()
    return math.sqrt(err / norm)


def test_full_rank_without_clamp_reproduces_the_difference(tmp_path, tiny_sd1):
    out = tmp_path / "full.safetensors"
    result = extract_lora(tiny_sd1.a, tiny_sd1.base, out, rank=4096, clamp=None, dtype="fp32",
                          text_encoder=True, svd="exact")
    assert result.table.overall < 1e-5
    assert _relative_error(tiny_sd1, out) < 1e-5
    # every changed block is reported; blocks the fine-tune left alone are skipped
    rows = {b: (e, n) for b, _, e, n in result.table.rows()}
    assert rows["IN04"][1] > 0 and "OUT03" not in rows and "BASE" in rows
    lora = read_lora(out)
    te = [m for m in lora.modules.values() if m.target.component == "te"]
    assert te and all(m.alpha == 4096 for m in lora.modules.values())


def _svd_tail(fam, rank):
    """sqrt(Σ dropped σ²) / ||Δ|| over every LoRA-able UNet weight."""
    dropped = total = 0.0
    for diff in _differences(fam).values():
        with threads_for(diff):
            s = torch.linalg.svdvals(as_matrix(diff).double())
        dropped += s[rank:].pow(2).sum().item()
        total += s.pow(2).sum().item()
    return math.sqrt(dropped / total)


def test_rank_r_error_is_the_svd_tail(tmp_path, tiny_sdxl):
    rank = 6
    tail = _svd_tail(tiny_sdxl, rank)
    exact = extract_lora(tiny_sdxl.a, tiny_sdxl.base, tmp_path / "e.safetensors", rank=rank,
                         clamp=None, dtype="fp32", svd="exact")
    assert exact.table.overall == pytest.approx(tail, rel=1e-4)
    low = extract_lora(tiny_sdxl.a, tiny_sdxl.base, tmp_path / "l.safetensors", rank=rank,
                       clamp=None, dtype="fp32", svd="lowrank")
    assert tail * (1 - 1e-5) <= low.table.overall <= tail * 1.02
    # unchanged modules are skipped, not factorised as zero
    assert low.svd_methods == {"lowrank": exact.svd_methods["exact"]}


def test_comfyui_format_clamp_and_bias_diff(tmp_path, tiny_sd1):
    out = tmp_path / "comfy.safetensors"
    extract_lora(tiny_sd1.a, tiny_sd1.base, out, rank=8, fmt="comfyui", bias_diff=True,
                 text_encoder=True, svd="exact", clamp=0.99)
    tensors = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert not any(k.endswith(".alpha") for k in tensors)
    key = "diffusion_model.input_blocks.7.0.in_layers.2"  # a 3x3 conv, 32 -> 64 channels
    assert tensors[f"{key}.lora_down.weight"].shape == (8, 32, 3, 3)
    assert tensors[f"{key}.lora_up.weight"].shape == (64, 8, 1, 1)
    assert f"{key}.diff_b" in tensors
    assert "diffusion_model.input_blocks.7.0.in_layers.0.diff" in tensors  # a norm's weight
    assert any(k.startswith("text_encoders.clip_l.transformer.text_model.encoder.") for k in tensors)
    # the clamp: both factors within ± the 0.99 quantile of their magnitudes, which is never
    # below ComfyUI's 0.99 quantile of the signed values, whatever signs the SVD gives
    a, b = open_checkpoint(tiny_sd1.a), open_checkpoint(tiny_sd1.base)
    diff = a.get(f"model.{key}.weight").float() - b.get(f"model.{key}.weight").float()
    up, down = factorize(diff, 8, method="exact")
    values = torch.cat([up.flatten(), down.flatten()])
    hi = torch.quantile(values.abs(), 0.99)
    cu, cd = clamp_factors(up, down)
    assert cu.abs().max() <= hi + 1e-6 and cd.abs().max() <= hi + 1e-6
    assert (cu.abs() >= hi - 1e-6).any() or (cd.abs() >= hi - 1e-6).any()  # it did clip
    for flip in (1.0, -1.0):
        assert hi >= torch.quantile(flip * values, 0.99)
    torch.testing.assert_close(tensors[f"{key}.lora_up.weight"].float().flatten(1), cu,
                               atol=2e-3, rtol=2e-3)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["mergesearch.arch"] == "sd1" and "ss_network_dim" not in meta


def test_full_diff_type_stores_whole_differences(tmp_path, tiny_sd1):
    out = tmp_path / "full_diff.safetensors"
    result = extract_lora(tiny_sd1.a, tiny_sd1.base, out, rank=4, lora_type="full_diff",
                          bias_diff=True)
    keys = load_file(str(out)).keys()
    assert keys and all(k.endswith((".diff", ".diff_b")) for k in keys)
    assert result.table.overall < 1e-3  # fp16 rounding only
    assert _relative_error(tiny_sd1, out) < 1e-3


def test_extract_refuses_mismatched_models(tmp_path, tiny_sd1, tiny_sdxl):
    with pytest.raises(LoraError, match="is Stable Diffusion XL but .* is Stable Diffusion 1.x"):
        extract_lora(tiny_sdxl.a, tiny_sd1.base, tmp_path / "x.safetensors", rank=4)
    with pytest.raises(LoraError, match="rank must be at least 1"):
        extract_lora(tiny_sd1.a, tiny_sd1.base, tmp_path / "x.safetensors", rank=0)
    with pytest.raises(LoraError, match="is a source model"):
        extract_lora(tiny_sd1.a, tiny_sd1.base, tiny_sd1.a, rank=4, overwrite=True)
    assert not (tmp_path / "x.safetensors").exists()


def _comfy_weights(arch: str, key: str, shape) -> list[tuple[slice, bool]]:
    """How ComfyUI's models hold an original 2-D+ weight: (rows, transposed) per weight.
    OpenCLIP's in_proj_weight is ComfyUI's q, k and v; its text_projection is transposed."""
    if arch == "sdxl" and key.startswith("conditioner.embedders.1.model."):
        if key.endswith("attn.in_proj_weight"):
            d = shape[0] // 3
            return [(slice(i * d, (i + 1) * d), False) for i in range(3)]
        if key.endswith("text_projection"):
            return [(slice(None), True)]
    return [(slice(None), False)]


@pytest.mark.parametrize("rank", [8, 32])
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_default_extraction_is_never_worse_than_comfyuis(tmp_path, tiny_sd1, tiny_sdxl, arch,
                                                         rank):
    fam = {"sd1": tiny_sd1, "sdxl": tiny_sdxl}[arch]
    out = tmp_path / "ours.safetensors"
    extract_lora(fam.a, fam.base, out, rank=rank, fmt="comfyui", text_encoder=True)  # defaults
    ours = layer_errors(out, fam.a, fam.base)
    a, b = load_file(str(fam.a)), load_file(str(fam.base))
    model = ("model.diffusion_model.", "cond_stage_model.", "conditioner.")
    layers = [k for k, v in a.items() if k.startswith(model) and v.ndim >= 2
              and v.is_floating_point() and not torch.equal(v, b[k])]
    assert len(layers) > 100 and any("token_embedding" in k for k in layers)
    worse = []
    for key in layers:
        diff = a[key].float() - b[key].float()
        err_sq = 0.0
        for rows, transposed in _comfy_weights(arch, key, diff.shape):
            d = diff[rows].T if transposed else diff[rows]
            up, down = comfyui_reference.extract_lora(d, rank)
            approx = (up.float().flatten(1) @ down.float().flatten(1)).reshape(d.shape)
            err_sq += (d - approx).double().pow(2).sum().item()
        norm_sq = diff.double().pow(2).sum().item()
        comfy, mine = math.sqrt(err_sq / norm_sq), math.sqrt(ours[key][0] / ours[key][1])
        assert ours[key][1] == pytest.approx(norm_sq, rel=1e-9)
        if mine > comfy * (1 + 1e-4) + 1e-7:
            worse.append((key, mine, comfy))
    assert not worse, f"{len(worse)} of {len(layers)} layers worse than ComfyUI's, e.g. {worse[:3]}"


def test_defaults_per_format_embeddings_and_bias_differences(tmp_path, tiny_sdxl):
    comfy = extract_lora(tiny_sdxl.a, tiny_sdxl.base, tmp_path / "c.safetensors", rank=4,
                         fmt="comfyui", text_encoder=True)
    keys = load_file(str(comfy.output)).keys()
    # as LoraSave: embeddings factorised, norms as .diff, biases as .diff_b
    for name in ("clip_l.transformer.text_model.embeddings.token_embedding",
                 "clip_l.transformer.text_model.embeddings.position_embedding",
                 "clip_g.transformer.text_model.embeddings.token_embedding",
                 "clip_g.transformer.text_model.embeddings.position_embedding"):
        assert f"text_encoders.{name}.lora_up.weight" in keys, name
    assert "text_encoders.clip_g.transformer.text_model.final_layer_norm.diff" in keys
    assert "diffusion_model.input_blocks.4.1.proj_in.diff_b" in keys
    assert not comfy.notes
    kohya = extract_lora(tiny_sdxl.a, tiny_sdxl.base, tmp_path / "k.safetensors", rank=4,
                         text_encoder=True)
    keys = load_file(str(kohya.output)).keys()
    assert not [k for k in keys if k.endswith((".diff", ".diff_b")) or "embedding" in k]
    assert "left out 4 text-encoder embedding(s)" in kohya.notes[0]
    with_bias = extract_lora(tiny_sdxl.a, tiny_sdxl.base, tmp_path / "kb.safetensors", rank=4,
                             text_encoder=True, bias_diff=True)
    keys = load_file(str(with_bias.output)).keys()
    assert "lora_unet_input_blocks_4_1_proj_in.diff_b" in keys
    assert "lora_te2_text_model_final_layer_norm.diff" in keys
