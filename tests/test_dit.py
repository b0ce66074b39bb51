"""SD3.5 Medium / Large and Flux.1 (DiTs) on their tiny families, and AuraFlow's merge node.

Every expected value is derived here: the layouts from ComfyUI's supported_models.py / sd.py
(SD3: text_encoders.*, first_stage_model.; Flux: text_encoders.*, vae.; BFL's bare transformer
file), merges from ComfyUI's ModelMergeBlocks rule (the longest slider name that starts the key
after ``diffusion_model.``, else the first slider) written out below, the MMDiT conversion from
diffusers' own ``convert_sd3_transformer_checkpoint_to_diffusers``, Flux's from BFL's layout
written out (diffusers' converter fixes Flux.1's width), LoRAs from diffusers'
``load_lora_weights`` + ``fuse_lora`` (PEFT names) and from W + s·(alpha/rank)·up@down (kohya).
"""

from __future__ import annotations

import json

import comfyui_reference
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_export_comfyui import evaluate_workflow

from evaluators import ProbeSet, generate
from evaluators.testing import write_tiny_open_clip
from merge_backend import ClipMerge, Recipe, Source, merge_to_file, open_checkpoint
from merge_backend.architectures import ARCHITECTURES
from merge_backend.checkpoint import CheckpointError
from merge_backend.engine import MergeEngine
from merge_backend.export import comfy_workflow
from merge_backend.lora import apply_to_pipeline, read_lora
from merge_backend.merge_file import apply_to_file
from merge_backend.naming import to_diffusers, to_original
from merge_backend.pipeline import empty_pipeline, load_pipeline
from merge_backend.recipe import LoraSpec, RecipeError, uniform_ratios
from merge_backend.tiny import tiny_base_state_dict
from search import run_folder as rf
from search.cli import main

DIT = "model.diffusion_model."
ARCHS = ["sd35_large", "sd35_medium", "flux1"]
# ComfyUI's slider names (comfy_extras/nodes_model_merging_model_specific.py), written out.
SLIDERS = {
    "sd35_large": ["pos_embed.", "x_embedder.", "context_embedder.", "y_embedder.", "t_embedder.",
                   *(f"joint_blocks.{i}." for i in range(38)), "final_layer."],
    "sd35_medium": ["pos_embed.", "x_embedder.", "context_embedder.", "y_embedder.",
                    "t_embedder.", *(f"joint_blocks.{i}." for i in range(24)), "final_layer."],
    "flux1": ["img_in.", "time_in.", "guidance_in", "vector_in.", "txt_in.",
              *(f"double_blocks.{i}." for i in range(19)),
              *(f"single_blocks.{i}." for i in range(38)), "final_layer."],
    "auraflow": ["init_x_linear.", "positional_encoding", "cond_seq_linear.", "register_tokens",
                 "t_embedder.", *(f"double_layers.{i}." for i in range(4)),
                 *(f"single_layers.{i}." for i in range(32)), "modF.", "final_linear."],
}
NODES = {"sd35_large": "ModelMergeSD35_Large", "sd35_medium": "ModelMergeSD3_2B",
         "flux1": "ModelMergeFlux1"}
TEXT = {"sd35_large": ("clip_l", "clip_g", "t5xxl"), "sd35_medium": ("clip_l", "clip_g", "t5xxl"),
        "flux1": ("clip_l", "t5xxl")}
VAE = {"sd35_large": "first_stage_model.", "sd35_medium": "first_stage_model.", "flux1": "vae."}


@pytest.fixture(params=ARCHS)
def fam(request, tiny_sd35_large, tiny_sd35_medium, tiny_flux1):
    return {"sd35_large": tiny_sd35_large, "sd35_medium": tiny_sd35_medium,
            "flux1": tiny_flux1}[request.param]


def comfy_ratio(sliders: dict[str, float], key: str) -> float:
    """ModelMergeBlocks: the longest slider that starts the key, else the first slider."""
    inner, ratio, longest = key[len(DIT):], next(iter(sliders.values())), 0
    for name, value in sliders.items():
        if inner.startswith(name) and len(name) > longest:
            ratio, longest = value, len(name)
    return ratio


def expected(a: dict, b: dict, ratio_of_key, clip_ratio: float | None = None) -> dict:
    out = {}
    for key, w1 in a.items():
        if key.startswith(DIT):
            r = ratio_of_key(key)
            out[key] = comfyui_reference.patch(w1, b[key], r, 1 - r)
        elif (clip_ratio is not None and key.startswith("text_encoders.")
              and not key.endswith("logit_scale")):
            out[key] = comfyui_reference.patch(w1, b[key], clip_ratio, 1 - clip_ratio)
        else:
            out[key] = w1
    return out


def assert_same(path, want: dict) -> None:
    got = load_file(str(path))
    assert set(got) == set(want)
    bad = [k for k in want if not torch.equal(got[k], want[k].to(got[k].dtype))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


# ---------------------------------------------------------------------------- layouts


def test_the_tiny_families_are_in_comfyuis_layout(fam):
    sd = load_file(str(fam.base))
    for name in TEXT[fam.arch]:  # CheckpointSave: text_encoder_key_prefix "text_encoders."
        assert any(k.startswith(f"text_encoders.{name}.transformer.") for k in sd), name
        assert f"text_encoders.{name}.logit_scale" in sd  # ComfyUI's CLIP modules hold one
    # the keys diffusers' single-file loader looks for
    assert "text_encoders.t5xxl.transformer.shared.weight" in sd
    assert ("text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight"
            in sd)
    vae = VAE[fam.arch]
    assert f"{vae}decoder.conv_in.weight" in sd and not any(
        k.startswith(("first_stage_model.", "vae.")) and not k.startswith(vae) for k in sd)
    blocks = {k.split(".")[3] for k in sd if k.startswith(f"{DIT}joint_blocks.")}
    attn2 = {int(k.split(".")[3]) for k in sd if ".x_block.attn2." in k}
    if fam.arch == "sd35_medium":  # MMDiT-X: a second attention in the first blocks
        assert attn2 == {0, 1} and len(blocks) == 4
    elif fam.arch == "sd35_large":
        assert not attn2 and f"{DIT}joint_blocks.0.x_block.attn.ln_q.weight" in sd
    else:
        assert f"{DIT}double_blocks.0.img_attn.norm.query_norm.scale" in sd  # BFL's spelling
        assert f"{DIT}guidance_in.in_layer.weight" in sd  # dev
    if fam.arch != "flux1":  # ComfyUI holds CLIP-L's projection as the identity
        proj = sd["text_encoders.clip_l.transformer.text_projection.weight"]
        assert torch.equal(proj, torch.eye(proj.shape[0]))
    for path in (fam.base, fam.a, fam.b):
        assert open_checkpoint(path).arch.name == fam.arch


def test_tiny_cli_writes_flux_in_both_layouts(tmp_path):
    assert main(["tiny", str(tmp_path), "--arch", "flux1"]) == 0
    bfl = load_file(str(tmp_path / "finetune_b.bfl.safetensors"))
    # Black Forest Labs' flux1-dev.safetensors: the bare transformer, nothing else
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.0.linear1.weight" in bfl
    assert not any(k.startswith(("model.", "text_encoders.", "vae.")) for k in bfl)
    comfy = load_file(str(tmp_path / "finetune_b.safetensors"))
    assert all(torch.equal(v, comfy[DIT + k]) for k, v in bfl.items())
    ckpt = open_checkpoint(tmp_path / "finetune_b.bfl.safetensors")
    assert ckpt.arch.name == "flux1" and ckpt.layout.name == "bfl"
    assert set(ckpt.keys()) == {k for k in comfy if k.startswith(DIT)}


def test_current_comfyuis_norm_spelling_and_schnell_are_flux(tiny_flux1, tmp_path):
    # ComfyUI's CheckpointSave now writes the q/k norms as '.weight'
    sd = load_file(str(tiny_flux1.b))
    renamed = {k.replace("_norm.scale", "_norm.weight"): v for k, v in sd.items()}
    assert renamed != sd
    save_file(renamed, str(tmp_path / "comfy_new.safetensors"))
    assert set(open_checkpoint(tmp_path / "comfy_new.safetensors").keys()) == set(sd)
    # schnell: no guidance embedder
    schnell = tiny_base_state_dict("flux1", _config(tmp_path, "flux1", "tiny_schnell"))
    assert not any(k.startswith(f"{DIT}guidance_in.") for k in schnell)
    save_file(schnell, str(tmp_path / "schnell.safetensors"))
    assert open_checkpoint(tmp_path / "schnell.safetensors").arch.name == "flux1"
    pipe = load_pipeline(tmp_path / "schnell.safetensors")  # its config folder found by size
    assert pipe.transformer.config.guidance_embeds is False


def _config(tmp_path, arch, size):
    from merge_backend.pipeline_configs import write_config_folder

    return write_config_folder(arch, tmp_path / f"{arch}-{size}", size=size)


def test_a_bare_sd3_transformer_is_refused_by_name(tiny_sd35_large, tmp_path):
    sd = {k[len(DIT):]: v for k, v in load_file(str(tiny_sd35_large.b)).items()
          if k.startswith(DIT)}
    save_file(sd, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="Stable Diffusion 3 MMDiT"):
        open_checkpoint(tmp_path / "bare.safetensors")


# ---------------------------------------------------------------------------- merges


def test_merge_layers_follows_comfyuis_node(fam, tmp_path):
    names = SLIDERS[fam.arch]
    assert list(ARCHITECTURES[fam.arch].block_names("comfy")) == names
    assert ARCHITECTURES[fam.arch].vocabularies["comfy"].node == NODES[fam.arch]
    g = torch.Generator().manual_seed(1)
    sliders = {n: round(float(v), 2) for n, v in zip(names, torch.rand(len(names), generator=g))}
    out = tmp_path / "m.safetensors"
    args = [a for n, v in sliders.items() for a in ("--ratio", f"{n}={v}")]
    assert main(["merge", "layers", str(fam.a), str(fam.b), "-o", str(out), "--dtype", "fp32",
                 *args]) == 0
    a, b = load_file(str(fam.a)), load_file(str(fam.b))
    assert_same(out, expected(a, b, lambda k: comfy_ratio(sliders, k)))


def test_merge_simple_with_clip_merge_and_coarse_blocks(fam, tmp_path):
    a, b = load_file(str(fam.a)), load_file(str(fam.b))
    out = tmp_path / "s.safetensors"
    assert main(["merge", "simple", str(fam.a), str(fam.b), "-o", str(out), "--ratio", "0.3",
                 "--clip", "simple", "--clip-ratio", "0.6", "--dtype", "fp32"]) == 0
    assert_same(out, expected(a, b, lambda k: 0.3, clip_ratio=0.6))
    # coarse: IN = the embedders, then the blocks in runs (the tiny models' few blocks all
    # fall in the first run), OUT = the final layer
    first = "double_blocks." if fam.arch == "flux1" else "joint_blocks."
    block = "D0" if fam.arch == "flux1" else "J0"
    out = tmp_path / "c.safetensors"
    assert main(["merge", "layers", str(fam.a), str(fam.b), "-o", str(out), "--dtype", "fp32",
                 "--vocabulary", "coarse", "--ratio", f"{block}=0.25", "--ratio", "OUT=0.0",
                 "--ratio", "IN=0.5"]) == 0

    def ratio(key):
        inner = key[len(DIT):]
        if inner.startswith(first):
            return 0.25
        if inner.startswith("final_layer."):
            return 0.0
        embed = ("img_in.", "time_in.", "guidance_in", "vector_in.", "txt_in.", "pos_embed",
                 "x_embedder.", "context_embedder.", "y_embedder.", "t_embedder.")
        return 0.5 if inner.startswith(embed) else 1.0
    assert_same(out, expected(a, b, ratio))


def test_a_bfl_file_merges_like_its_comfyui_twin(tiny_flux1, tmp_path):
    outs = []
    for i, b in enumerate((tiny_flux1.b, tiny_flux1.layouts["bfl"])):
        outs.append(tmp_path / f"m{i}.safetensors")
        assert main(["merge", "layers", str(tiny_flux1.a), str(b), "-o", str(outs[-1]),
                     "--dtype", "fp32", "--ratio", "double_blocks.1.=0.2",
                     "--ratio", "single_blocks.0.=0.7"]) == 0
    assert_same(outs[1], load_file(str(outs[0])))
    # two BFL files: the merged transformer alone, in the layout ComfyUI's ModelSave writes
    out = tmp_path / "bfl.safetensors"
    assert main(["merge", "simple", str(tiny_flux1.layouts["bfl"]), str(tiny_flux1.layouts["bfl"]),
                 "-o", str(out), "--dtype", "fp32"]) == 0
    assert set(load_file(str(out))) == {k for k in load_file(str(tiny_flux1.b)) if k.startswith(DIT)}
    # a live pipeline needs model1's text encoders, which a BFL file does not hold
    bfl_first = Recipe(arch="flux1", method="weighted_sum", vocabulary="single",
                       ratios={"all": 0.5}, models={"model1": Source(str(tiny_flux1.layouts["bfl"])),
                                                    "model2": Source(str(tiny_flux1.a))})
    with pytest.raises(RecipeError, match="bfl layout"):
        MergeEngine(empty_pipeline("flux1", "tiny"), bfl_first)


def test_auraflow_is_one_data_file(tmp_path):
    """ModelMergeAuraflow on a hand-built file in ComfyUI's AuraFlow layout."""
    g = torch.Generator().manual_seed(0)

    def model(seed):
        g.manual_seed(seed)
        keys = ["init_x_linear.weight", "positional_encoding", "cond_seq_linear.weight",
                "register_tokens", "t_embedder.mlp.0.weight", "modF.1.weight",
                "final_linear.weight", *(f"double_layers.{i}.attn.w1q.weight" for i in range(4)),
                *(f"single_layers.{i}.attn.w1q.weight" for i in range(32))]
        sd = {DIT + k: torch.randn(3, 4, generator=g) for k in keys}
        sd["text_encoders.pile_t5xl.transformer.shared.weight"] = torch.randn(5, 4, generator=g)
        sd["vae.decoder.conv_in.weight"] = torch.randn(2, 2, generator=g)
        return sd
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(model(1), str(a))
    save_file(model(2), str(b))
    assert open_checkpoint(a).arch.name == "auraflow"
    names = SLIDERS["auraflow"]
    assert list(ARCHITECTURES["auraflow"].block_names("comfy")) == names
    sliders = {n: round(0.02 * i, 2) for i, n in enumerate(names)}
    out = tmp_path / "m.safetensors"
    assert main(["merge", "layers", str(a), str(b), "-o", str(out), "--dtype", "fp32",
                 *(x for n, v in sliders.items() for x in ("--ratio", f"{n}={v}"))]) == 0
    assert_same(out, expected(load_file(str(a)), load_file(str(b)),
                              lambda k: comfy_ratio(sliders, k)))


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("arch", ["sd35_large", "sd35_medium"])
def test_mmdit_names_agree_with_diffusers_converter(arch, tiny_sd35_large, tiny_sd35_medium):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    fam = {"sd35_large": tiny_sd35_large, "sd35_medium": tiny_sd35_medium}[arch]
    sd = load_file(str(fam.a))
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(
        {k: v for k, v in sd.items() if k.startswith(DIT)})
    pipe = load_pipeline(fam.a)  # diffusers' from_single_file
    ours = to_diffusers(ARCHITECTURES[arch], "transformer", sd, pipe.transformer)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    back = to_original(ARCHITECTURES[arch], "transformer", ours)
    assert all(torch.equal(back[k], sd[k]) for k in back) and len(back) == sum(
        k.startswith(DIT) for k in sd)


def test_flux_names_are_bfls(tiny_flux1):
    """BFL's layout written out: linear1 = [q; k; v; mlp_in], qkv = [q; k; v], the final
    modulation (shift, scale) where diffusers holds (scale, shift)."""
    pipe = empty_pipeline("flux1", "tiny", seed=3)
    t = {k: v for k, v in pipe.transformer.state_dict().items()}
    sd = to_original(ARCHITECTURES["flux1"], "transformer", t)
    s0 = "single_transformer_blocks.0."
    assert torch.equal(sd[f"{DIT}single_blocks.0.linear1.weight"], torch.cat(
        [t[f"{s0}attn.to_q.weight"], t[f"{s0}attn.to_k.weight"], t[f"{s0}attn.to_v.weight"],
         t[f"{s0}proj_mlp.weight"]]))
    assert torch.equal(sd[f"{DIT}double_blocks.1.txt_attn.qkv.bias"], torch.cat(
        [t[f"transformer_blocks.1.attn.add_{x}_proj.bias"] for x in "qkv"]))
    scale, shift = t["norm_out.linear.weight"].chunk(2)
    assert torch.equal(sd[f"{DIT}final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    assert torch.equal(sd[f"{DIT}double_blocks.0.img_attn.norm.key_norm.scale"],
                       t["transformer_blocks.0.attn.norm_k.weight"])
    assert len(sd) == len(load_file(str(tiny_flux1.base))) - sum(
        not k.startswith(DIT) for k in load_file(str(tiny_flux1.base)))


# ---------------------------------------------------------------------------- engine, probes


def _recipe(fam, clip=None, vocabulary="comfy", arithmetic="comfy", method="weighted_sum"):
    g = torch.Generator().manual_seed(5)
    names = uniform_ratios(fam.arch, vocabulary, 0)
    ratios = {k: round(float(v), 3) for k, v in zip(names, torch.rand(len(names), generator=g))}
    models = {"model1": Source(str(fam.a)), "model2": Source(str(fam.b))}
    if method == "add_difference":
        models["base"] = Source(str(fam.base))
    return Recipe(arch=fam.arch, method=method, models=models, vocabulary=vocabulary,
                  ratios=ratios, multiplier=0.7, clip=clip, arithmetic=arithmetic)


@pytest.mark.parametrize("clip,vocabulary,arithmetic,method", [
    (ClipMerge("weighted_sum", 0.3), "comfy", "comfy", "weighted_sum"),
    (None, "coarse", "fast", "add_difference"),
])
def test_engine_equals_the_file_merge_and_draws(fam, tmp_path, clip, vocabulary, arithmetic,
                                                method):
    recipe = _recipe(fam, clip, vocabulary, arithmetic, method)
    pipe = load_pipeline(fam.a)  # model1's VAE: the engine writes only what merges
    engine = MergeEngine(pipe, recipe)
    engine.apply(recipe)
    path = merge_to_file(recipe, tmp_path / "m.safetensors", dtype="fp32").output
    ref = load_file(str(path))
    arch = ARCHITECTURES[fam.arch]
    live = {}
    for c in (arch.diffusion, *arch.text_encoders):
        live.update(to_original(arch, c.name, getattr(pipe, c.folder).state_dict()))
    # CLIP-L's projection stays the identity diffusers' SD3 loader sets (ComfyUI never uses it)
    eye = "text_encoders.clip_l.transformer.text_projection.weight"
    if eye in live:
        assert torch.equal(live.pop(eye), torch.eye(ref[eye].shape[0]))
    bad = [k for k, v in live.items() if not torch.equal(v, ref[k])]
    assert not bad and len(live) > 150, bad[:3]
    if clip is None:
        return
    probes = ProbeSet(prompts=["a red apple"], seeds=[3], steps=2, width=64, height=64,
                      scheduler="flow_euler", cfg=3.0)
    drawn = generate(pipe, probes).images
    again = generate(load_pipeline(path), probes).images
    assert drawn.shape == (1, 3, 64, 64) and torch.isfinite(drawn).all() and drawn.std() > 0
    torch.testing.assert_close(drawn, again, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="flow_euler"):  # an SD sampler on a flow model
        generate(pipe, ProbeSet(prompts=["x"], seeds=[0], steps=1, width=64, height=64))


# ---------------------------------------------------------------------------- LoRAs

# (original key, PEFT module) pairs a LoRA changes, including split and swapped tensors
PEFT = {
    "sd35": [("joint_blocks.1.x_block.attn.qkv.weight", "transformer_blocks.1.attn.to_k"),
             ("joint_blocks.0.context_block.attn.qkv.weight", "transformer_blocks.0.attn.add_v_proj"),
             ("joint_blocks.0.x_block.mlp.fc1.weight", "transformer_blocks.0.ff.net.0.proj"),
             ("final_layer.adaLN_modulation.1.weight", "norm_out.linear")],
    "flux1": [("single_blocks.1.linear1.weight", "single_transformer_blocks.1.attn.to_v"),
              ("single_blocks.1.linear1.weight", "single_transformer_blocks.1.proj_mlp"),
              ("double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.to_q"),
              ("final_layer.adaLN_modulation.1.weight", "norm_out.linear")],
}


def _peft_lora(fam, tmp_path):
    pipe = empty_pipeline(fam.arch, "tiny")
    g = torch.Generator().manual_seed(11)
    sd = {}
    for _, module in PEFT["flux1" if fam.arch == "flux1" else "sd35"]:
        weight = pipe.transformer.get_submodule(module).weight
        sd[f"transformer.{module}.lora_A.weight"] = torch.randn(2, weight.shape[1], generator=g)
        sd[f"transformer.{module}.lora_B.weight"] = torch.randn(weight.shape[0], 2, generator=g)
    path = tmp_path / "peft.safetensors"
    save_file(sd, str(path))
    return path


def test_a_peft_lora_fuses_as_diffusers_fuses_it(fam, tmp_path):
    path = _peft_lora(fam, tmp_path)
    ours = load_pipeline(fam.a)
    assert apply_to_pipeline(ours, [(read_lora(path, fam.arch), 0.7)]) >= 4
    theirs = load_pipeline(fam.a)
    theirs.load_lora_weights(str(path))
    theirs.fuse_lora(lora_scale=0.7)
    theirs.unload_lora_weights()
    base = load_pipeline(fam.a).transformer.state_dict()
    mine, other = ours.transformer.state_dict(), theirs.transformer.state_dict()
    assert sum(not torch.equal(mine[k], base[k]) for k in mine) >= 4
    for key in mine:
        torch.testing.assert_close(other[key], mine[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_kohya_lora_on_fused_tensors_applies_by_the_formula(fam, tmp_path):
    """kohya (sd-scripts) names the original modules: a fused qkv / linear1 is one module."""
    sd = load_file(str(fam.a))
    keys = ([f"{DIT}single_blocks.0.linear1.weight", f"{DIT}double_blocks.1.img_attn.qkv.weight",
             f"{DIT}final_layer.adaLN_modulation.1.weight"] if fam.arch == "flux1" else
            [f"{DIT}joint_blocks.0.x_block.attn.qkv.weight",
             f"{DIT}joint_blocks.2.context_block.adaLN_modulation.1.weight"])
    keys.append("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
    g = torch.Generator().manual_seed(2)
    lora, want = {}, {}
    for key in keys:
        if key.startswith(DIT):
            name = "lora_unet_" + key[len(DIT):-len(".weight")].replace(".", "_")
        else:  # kohya: lora_te1_ + the transformers path
            name = "lora_te1_" + key.split("transformer.", 1)[1][:-len(".weight")].replace(".", "_")
        out, inner = sd[key].shape
        up, down = torch.randn(out, 4, generator=g), torch.randn(4, inner, generator=g)
        lora |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                 f"{name}.alpha": torch.tensor(2.0)}
        want[key] = sd[key] + 0.8 * (2.0 / 4) * (up @ down)
    path = tmp_path / "kohya.safetensors"
    save_file(lora, str(path))
    out = apply_to_file(fam.a, [LoraSpec(str(path), 0.8)], tmp_path / "out.safetensors",
                        dtype="fp32").output
    got = load_file(str(out))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert sum(not torch.equal(got[k], sd[k]) for k in sd if k in got) == len(keys)


# ---------------------------------------------------------------------------- ComfyUI


def test_workflow_rebuilds_the_checkpoint(fam, tmp_path):
    recipe = _recipe(fam, ClipMerge("weighted_sum", 0.4))
    out = merge_to_file(recipe, tmp_path / "m.safetensors", dtype="fp32").output
    api = comfy_workflow(recipe).api()
    kinds = [n["class_type"] for n in api.values()]
    assert kinds.count("CheckpointLoaderSimple") == 2 and NODES[fam.arch] in kinds
    assert "EmptySD3LatentImage" in kinds  # 16 latent channels
    files = {p.name: p for p in (fam.a, fam.b)}
    rebuilt, exported = evaluate_workflow(api, files), load_file(str(out))
    keys = [k for k in exported if not k.endswith("logit_scale")]
    bad = [k for k in keys if not torch.equal(rebuilt[k].to(exported[k].dtype), exported[k])]
    assert not bad and len(keys) > 300, bad[:3]


def test_workflow_of_bfl_files_loads_them_as_comfyui_does(tiny_flux1, tmp_path):
    bfl = tmp_path / "flux1-dev-tuned.safetensors"
    bfl.write_bytes(tiny_flux1.layouts["bfl"].read_bytes())
    recipe = Recipe(arch="flux1", method="weighted_sum", vocabulary="single", ratios={"all": 0.4},
                    models={"model1": Source(str(bfl)), "model2": Source(str(tiny_flux1.a))})
    api = comfy_workflow(recipe).api()
    by_kind = {n["class_type"]: n["inputs"] for n in api.values()}
    assert by_kind["UNETLoader"]["unet_name"] == bfl.name
    assert by_kind["CheckpointLoaderSimple"]["ckpt_name"] == tiny_flux1.a.name
    assert by_kind["DualCLIPLoader"]["type"] == "flux" and "VAELoader" in by_kind
    assert "ModelSave" in by_kind and "CheckpointSave" not in by_kind
    out = merge_to_file(recipe, tmp_path / "m.safetensors", dtype="fp32").output
    rebuilt = evaluate_workflow(api, {bfl.name: bfl, tiny_flux1.a.name: tiny_flux1.a})
    exported = load_file(str(out))
    assert set(exported) == set(rebuilt)
    assert all(torch.equal(rebuilt[k], exported[k]) for k in exported)


# ---------------------------------------------------------------------------- a study


@pytest.mark.slow
@pytest.mark.parametrize("arch,vocabulary", [("flux1", "coarse"), ("sd35_medium", "comfy")])
def test_a_cpu_study_runs_and_exports(arch, vocabulary, tiny_flux1, tiny_sd35_medium, tmp_path):
    fam = {"flux1": tiny_flux1, "sd35_medium": tiny_sd35_medium}[arch]
    clip = write_tiny_open_clip(tmp_path / "clip", name=f"{arch}-clip", seed=0)
    config = {
        "name": arch, "models": {"model1": str(fam.a), "model2": str(fam.b)},
        "config_folder": str(fam.config_folder),
        "merge": {"vocabulary": vocabulary, "arithmetic": "fast"},
        "probes": {"prompts": ["a red apple"], "seeds": [1], "steps": 2, "width": 64,
                   "height": 64, "scheduler": "flow_euler", "cfg": 3.0},
        "scorers": [{"kind": "clip", "model": str(clip[0]), "weights": str(clip[1])}],
        "warm_start": {"model1": True, "model2": False, "uniform": []},
        "trials": 2, "output": str(tmp_path / "runs"), "device": "cpu",
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "runs" / arch
    study = rf.RunFolder.load(run).study()
    assert len(rf.completed(study)) == 2
    best = rf.trial_recipe(rf.ranked(study)[0])
    assert best.arch == arch and set(best.ratios) == set(uniform_ratios(arch, vocabulary, 0))
    out = tmp_path / "exports"
    assert main(["export", str(run), "--best", "--to", "checkpoint", "--to", "comfyui",
                 "--dtype", "fp32", "-o", str(out)]) == 0
    assert open_checkpoint(next(out.glob("*.safetensors"))).arch.name == arch
    workflow = json.loads(next(out.glob("*.api.json")).read_text())
    assert NODES[arch] in {n["class_type"] for n in workflow.values()}
