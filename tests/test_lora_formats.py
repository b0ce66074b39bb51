"""LoRA files in and out: every spelling resolves to the right original key, the formats agree
on the delta, and bad files fail with messages that name the file and the key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_backend.checkpoint import open_checkpoint
from merge_backend.lora import (
    LoraError,
    LoraUse,
    check_loras,
    lora_deltas_for_key,
    name_table,
    random_lora,
    read_lora,
    save_lora,
)
from merge_backend.lora.svd import quantile


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_spelling_of_every_module_resolves_to_it(arch):
    table = name_table(arch)
    for target in table.targets:
        for fmt in ("kohya", "comfyui", "peft"):
            if fmt == "comfyui" and target.component == "unet" and table.original_path(target) is None:
                continue
            assert table.resolve(table.name(target, fmt)) == target, (fmt, target)


def test_kohya_names_follow_kohya_layout():
    sd1, sdxl = name_table("sd1"), name_table("sdxl")
    t = sd1.resolve("lora_unet_down_blocks_0_attentions_0_proj_in")
    assert t.key == "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    # ComfyUI also reads SD1 files named by original paths
    assert sd1.resolve("lora_unet_input_blocks_1_1_proj_in") == t
    assert sd1.resolve("lora_te_text_model_encoder_layers_0_self_attn_q_proj").key == (
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
    x = sdxl.resolve("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
    assert x.key == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert sdxl.name(x, "kohya") == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    v = sdxl.resolve("lora_te2_text_model_encoder_layers_3_self_attn_v_proj")
    assert (v.key, v.index, v.parts) == (
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight", 2, 3)
    assert sdxl.resolve("lora_unet_label_emb_0_0").key == "model.diffusion_model.label_emb.0.0.weight"
    assert sdxl.resolve("lora_unet_input_blocks_3_0_op").kind == "conv"


def test_sd2_names_follow_kohya_and_comfyui():
    sd2 = name_table("sd2")
    q = sd2.resolve("lora_te_text_model_encoder_layers_5_self_attn_q_proj")
    # OpenCLIP-H keeps q/k/v as one in_proj_weight: q is its first third
    assert (q.key, q.index, q.parts) == (
        "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight", 0, 3)
    assert sd2.name(q, "comfyui") == ("text_encoders.clip_h.transformer.text_model.encoder."
                                      "layers.5.self_attn.q_proj")
    t = sd2.resolve("lora_unet_down_blocks_0_attentions_0_proj_in")  # diffusers paths, as SD1
    assert t.key == "model.diffusion_model.input_blocks.1.1.proj_in.weight"


def test_sd1_and_sd2_loras_are_told_apart_by_their_shapes(tmp_path, tiny_sd1, tiny_sd2):
    """SD1 and SD2 share every kohya name; without metadata the module shapes decide."""
    for fam in (tiny_sd1, tiny_sd2):
        ckpt = open_checkpoint(fam.base)
        lora = random_lora(ckpt, rank=2, components=("unet", "te"), every=3)
        path = save_lora(lora, tmp_path / f"{fam.arch}.safetensors", dtype=torch.float32)
        bare = tmp_path / f"{fam.arch}-bare.safetensors"
        save_file(load_file(str(path)), str(bare))  # no metadata at all
        assert read_lora(bare).arch.name == fam.arch


def _all_deltas(uses, ckpt):
    keys = sorted({k for u in uses for k in u.keys()})
    return {k: lora_deltas_for_key(uses, k, ckpt.shape(k)) for k in keys}


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_written_files_read_back_to_the_same_deltas(tmp_path, tiny_sdxl, fmt):
    ckpt = open_checkpoint(tiny_sdxl.base)
    lora = random_lora(ckpt, rank=4, components=("unet", "te1", "te2"), vary_alpha=True, seed=1)
    path = save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt=fmt, dtype=torch.float32)
    back = read_lora(path)
    assert back.arch.name == "sdxl" and back.format == fmt and len(back.modules) == len(lora.modules)
    want, got = _all_deltas([LoraUse(lora)], ckpt), _all_deltas([LoraUse(back)], ckpt)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    keys = load_file(str(path)).keys()
    if fmt == "comfyui":
        assert not any(k.endswith(".alpha") for k in keys)
        assert any(k.startswith("diffusion_model.input_blocks.") for k in keys)
        assert any(k.startswith("text_encoders.clip_g.transformer.text_model.") for k in keys)
    else:  # one alpha for every module: diffusers reads other alphas wrongly
        alphas = {float(v) for k, v in load_file(str(path)).items() if k.endswith(".alpha")}
        assert len(alphas) == 1


def test_peft_file_with_diffusers_alpha_metadata(tmp_path, tiny_sd1):
    ckpt = open_checkpoint(tiny_sd1.base)
    lora = random_lora(ckpt, rank=4, components=("unet", "te"), every=7, seed=2)
    table = name_table("sd1")
    tensors = {}
    for m in lora.modules.values():
        name = table.name(m.target, "peft")
        tensors[f"{name}.lora_A.weight"] = m.down
        tensors[f"{name}.lora_B.weight"] = m.up
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 4,
                                                 "text_encoder.lora_alpha": 2})}
    save_file(tensors, str(tmp_path / "peft.safetensors"), metadata=meta)
    back = read_lora(tmp_path / "peft.safetensors")
    assert back.format == "peft" and back.arch.name == "sd1"
    for slot, m in lora.modules.items():
        expect = 2.0 if m.target.component == "unet" else 0.5
        torch.testing.assert_close(back.modules[slot].delta(), m.delta() * expect)


def test_missing_alpha_means_alpha_equals_rank(tmp_path, tiny_sd1):
    ckpt = open_checkpoint(tiny_sd1.base)
    lora = random_lora(ckpt, rank=4, every=5, alpha=1.0)
    path = save_lora(lora, tmp_path / "a.safetensors", dtype=torch.float32)
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".alpha")}
    save_file(tensors, str(tmp_path / "no_alpha.safetensors"))
    back = read_lora(tmp_path / "no_alpha.safetensors")
    m = next(iter(back.modules.values()))
    assert m.alpha is None and m.scale == 1.0
    up, down = m.up.flatten(1), m.down.flatten(1)
    torch.testing.assert_close(m.delta().flatten(1), up @ down)


def test_conv3x3_delta_is_up_times_flattened_down():
    table = name_table("sd1")
    target = table.resolve("lora_unet_down_blocks_1_resnets_0_conv1")
    up, down = torch.randn(64, 4, 1, 1), torch.randn(4, 32, 3, 3)
    from merge_backend.lora import LoraModule

    delta = LoraModule(target, up, down, alpha=2.0).delta()
    expect = (up.reshape(64, 4) @ down.reshape(4, 32 * 9)).reshape(64, 32, 3, 3) * 0.5
    torch.testing.assert_close(delta, expect)


def test_lora_for_another_architecture_is_refused(tmp_path, tiny_sd1, tiny_sdxl):
    xl = random_lora(open_checkpoint(tiny_sdxl.base), rank=2, components=("unet", "te1", "te2"))
    path = save_lora(xl, tmp_path / "xl.safetensors")
    with pytest.raises(LoraError, match=r"xl\.safetensors.*match no Stable Diffusion 1\.x module, "
                                         r"e\.g\. lora_te1_.*looks like a LoRA for Stable Diffusion XL"):
        read_lora(path, "sd1")
    # without an architecture it is read as what it is
    assert read_lora(path).arch.name == "sdxl"
    with pytest.raises(LoraError, match="is a LoRA for Stable Diffusion XL"):
        check_loras([LoraUse(read_lora(path))], open_checkpoint(tiny_sd1.base))


def test_wrong_shapes_name_the_key_and_both_shapes(tmp_path, tiny_sd1):
    ckpt = open_checkpoint(tiny_sd1.base)
    lora = random_lora(ckpt, rank=2, every=9)
    module = next(m for m in lora.modules.values() if m.up.ndim == 2)
    module.up = torch.randn(module.up.shape[0] + 3, 2)
    path = save_lora(lora, tmp_path / "bad.safetensors")
    use = LoraUse(read_lora(path))
    key = module.target.key
    with pytest.raises(LoraError, match=rf"bad\.safetensors.*changes {key} with shape "
                                        rf"\[{module.up.shape[0]}, .*has \[{ckpt.shape(key)[0]}, "):
        check_loras([use], ckpt)
    with pytest.raises(LoraError, match=rf"changes {key} with shape"):
        lora_deltas_for_key([use], key, ckpt.shape(key))


def test_unsupported_and_broken_files(tmp_path, tiny_sd1):
    save_file({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(LoraError,
                       match=r"loha\.safetensors: LoHa module 'lora_unet_conv_in' lacks hada_w1_b"):
        read_lora(tmp_path / "loha.safetensors")
    save_file({"lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(LoraError, match=r"half\.safetensors.*'lora_unet_conv_in' has only a lora_up"):
        read_lora(tmp_path / "half.safetensors")
    with pytest.raises(LoraError, match="are not LoRA weights"):
        read_lora(tiny_sd1.base)  # a checkpoint, not a LoRA
    with pytest.raises(LoraError, match="no such LoRA file"):
        read_lora(tmp_path / "missing.safetensors")


def test_quantile_matches_torch_and_handles_huge_inputs():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000, 12345):
        x = torch.randn(n, generator=gen)
        for q in (0.0, 0.5, 0.99, 1.0):
            torch.testing.assert_close(quantile(x, q), torch.quantile(x, q))
    # torch.quantile refused inputs over 2**24 elements before torch 2.14 (and may on CUDA)
    big = torch.randn((1 << 24) + 5, generator=gen)
    value = quantile(big, 0.99)
    assert abs(value.item() - 2.3263) < 0.01  # the normal distribution's 0.99 quantile


def _lorasave_sdxl(ckpt, path, rank: int = 3) -> dict[str, tuple[str, str, slice, bool, object]]:
    """An SDXL file as ComfyUI's "Extract and Save Lora" writes one (fp16, no alpha, LoraSave
    names, ``.diff`` / ``.diff_b``), with the module it writes for CLIP-L's text_projection
    (ComfyUI's own identity weight: a zero difference, so up = 0). Hand-built from ComfyUI's
    key layout: returns file name -> (role, original key, rows, transposed, tensors)."""
    g = torch.Generator().manual_seed(11)
    te1, te2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
    d2 = ckpt.shape(te2 + "transformer.resblocks.0.attn.in_proj_weight")[1]
    plan = {  # LoraSave module -> (kind, original key, rows of it, transposed)
        "diffusion_model.input_blocks.4.1.proj_in":
            ("lora", "model.diffusion_model.input_blocks.4.1.proj_in.weight", slice(None), False),
        "diffusion_model.input_blocks.4.1.proj_in.b":
            ("diff_b", "model.diffusion_model.input_blocks.4.1.proj_in.bias", slice(None), False),
        "diffusion_model.input_blocks.4.0.in_layers.0":
            ("diff", "model.diffusion_model.input_blocks.4.0.in_layers.0.weight", slice(None), False),
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1":
            ("lora", te1 + "text_model.encoder.layers.0.mlp.fc1.weight", slice(None), False),
        "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding":
            ("lora", te1 + "text_model.embeddings.token_embedding.weight", slice(None), False),
        "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.k_proj":
            ("lora", te2 + "transformer.resblocks.0.attn.in_proj_weight", slice(d2, 2 * d2), False),
        "text_encoders.clip_g.transformer.text_projection":
            ("lora", te2 + "text_projection", slice(None), True),
    }
    tensors, out = {}, {}
    for name, (kind, key, rows, transposed) in plan.items():
        shape = ckpt.shape(key)
        shape = tuple(reversed(shape)) if transposed else shape
        n_rows = len(range(shape[0])[rows])
        if kind == "lora":
            up = (torch.randn(n_rows, rank, generator=g) * 0.1).half()
            down = (torch.randn(rank, *shape[1:], generator=g) * 0.1).half()
            tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = up, down
            value = (up.float() @ down.float()).reshape(n_rows, *shape[1:])
        else:
            value = (torch.randn(shape, generator=g) * 0.01).half()
            tensors[name.removesuffix(".b") + f".{kind}"] = value
            value = value.float()
        out[name] = (key, rows, transposed, value)
    hidden = ckpt.shape(te1 + "text_model.final_layer_norm.weight")[0]
    tensors["text_encoders.clip_l.transformer.text_projection.lora_up.weight"] = \
        torch.zeros(hidden, rank, dtype=torch.float16)
    tensors["text_encoders.clip_l.transformer.text_projection.lora_down.weight"] = \
        torch.linalg.qr(torch.randn(hidden, rank, generator=g))[0].T.contiguous().half()
    save_file(tensors, str(path))
    return out


def test_comfyui_lorasave_file_with_clip_l_text_projection(tmp_path, tiny_sdxl, capsys):
    from search import cli

    ckpt = open_checkpoint(tiny_sdxl.a)
    lora_path = tmp_path / "ComfyUI_extracted_lora_00001_.safetensors"
    modules = _lorasave_sdxl(ckpt, lora_path)
    lora = read_lora(lora_path)  # ComfyUI loads it; so do we, and say what we left out
    assert lora.format == "comfyui" and lora.arch.name == "sdxl"
    assert lora.ignored == ["text_encoders.clip_l.transformer.text_projection"]
    assert "CLIP-L's text_projection" in lora.notes()[0]
    out = tmp_path / "styled.safetensors"
    assert cli.main(["lora", "apply", str(tiny_sdxl.a), f"{lora_path}:0.8", "--dtype", "fp32",
                     "-o", str(out), "--quiet"]) == 0
    assert "ignored 1 module(s) (text_encoders.clip_l.transformer.text_projection)" in \
        capsys.readouterr().err
    got, a = load_file(str(out)), load_file(str(tiny_sdxl.a))
    expected = {k: v.clone() for k, v in a.items() if k in got}
    for key, rows, transposed, value in modules.values():
        # LoraLoader: weight += strength * (up @ down) (no alpha: scale 1); .diff / .diff_b
        # patches: weight += strength * diff; ComfyUI's weights are the transposes of OpenCLIP's
        w = expected[key].T if transposed else expected[key]
        w[rows] += 0.8 * value
    bad = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
    assert sum(not torch.equal(got[k], a[k]) for k in expected) == len(modules)
    # a module that is neither ComfyUI's own nor SDXL's is still refused, naming it
    save_file({**load_file(str(lora_path)),
               "text_encoders.clip_l.transformer.bogus.lora_up.weight": torch.zeros(4, 1),
               "text_encoders.clip_l.transformer.bogus.lora_down.weight": torch.zeros(1, 4)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraError, match="1 of .* match no Stable Diffusion XL module, e.g. "
                                        "text_encoders.clip_l.transformer.bogus"):
        read_lora(tmp_path / "bad.safetensors")
