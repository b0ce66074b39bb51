"""The rest of the formats users have: the old diffusers attention-processor layout, PEFT
``lora_B.bias``, files mixing readable and unreadable kinds (bundled embeddings, PEFT BOFT)
read only with ``partial``, and the ComfyUI export of weight-dependent kinds.

Expected values are written out here (up @ down for the old layout) or come from PEFT's own
merge (``lora_bias``), never from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_lora_weighted import build_lycoris, build_peft_dora

from merge_backend import Recipe, Source, merge_to_file
from merge_backend.export import ComfyExportError, comfy_workflow
from merge_backend.lora import LoraError, apply_to_pipeline, read_lora
from merge_backend.methods.comfyui_reference import evaluate_workflow
from merge_backend.pipeline import load_pipeline
from merge_backend.recipe import LoraSpec, uniform_ratios
from search.cli import build_parser


def _attn_linears(unet):
    for path, mod in unet.named_modules():
        if path.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) and "attn" in path:
            yield path, mod


@pytest.mark.parametrize("fam_name", ["tiny_sd1", "tiny_sdxl"])
def test_old_diffusers_attention_processor_layout_applies(request, tmp_path, fam_name):
    fam = request.getfixturevalue(fam_name)
    base = load_pipeline(fam.base, config_folder=fam.config_folder)
    gen = torch.Generator().manual_seed(0)
    tensors, want = {}, {}
    for path, mod in _attn_linears(base.unet):
        out, inp = mod.weight.shape
        up, down = torch.randn(out, 2, generator=gen) * 0.1, torch.randn(2, inp, generator=gen) * 0.1
        attn, proj = path.removesuffix(".0").rsplit(".", 1)
        stem = f"unet.{attn}.processor.{proj}_lora"  # diffusers < 0.20: save_attn_procs
        tensors |= {f"{stem}.up.weight": up, f"{stem}.down.weight": down}
        want[path] = mod.weight.detach() + 0.5 * up @ down  # no alpha in this layout
    path = tmp_path / "attn_procs.safetensors"
    save_file(tensors, str(path))
    lora = read_lora(path)
    assert lora.format == "diffusers-attn-processor" and len(lora.modules) == len(want) > 10
    live = load_pipeline(fam.base, config_folder=fam.config_folder)
    apply_to_pipeline(live, [(lora, 0.5)])
    for mpath, w in want.items():
        got = live.unet.get_submodule(mpath).weight.detach()
        assert float((got - w).norm() / w.norm()) <= 1e-6, mpath


def test_peft_lora_b_bias_equals_peft_merge(tmp_path, tiny_sd1):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    fam = tiny_sd1
    src = load_pipeline(fam.base, config_folder=fam.config_folder)
    names = [p for p, m in src.unet.named_modules() if isinstance(m, torch.nn.Linear)
             and m.bias is not None and "time_emb" not in p]
    wrapped = get_peft_model(src.unet, LoraConfig(r=4, lora_alpha=2, target_modules=names,
                                                  lora_bias=True))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    tensors = {f"unet.{k.removeprefix('base_model.model.')}": v.detach().clone().contiguous()
               for k, v in get_peft_model_state_dict(wrapped).items()}
    assert any(k.endswith("lora_B.bias") for k in tensors)
    path = tmp_path / "peft_bias.safetensors"
    save_file(tensors, str(path), {"lora_adapter_metadata": json.dumps(
        {"unet.r": 4, "unet.lora_alpha": 2})})
    merged = wrapped.merge_and_unload()  # PEFT's own merge: the reference
    live = load_pipeline(fam.base, config_folder=fam.config_folder)
    apply_to_pipeline(live, [(read_lora(path), 1.0)])
    for name in names:
        ref, got = merged.get_submodule(name), live.unet.get_submodule(name)
        for what in ("weight", "bias"):
            want, have = getattr(ref, what).detach(), getattr(got, what).detach()
            assert float((have - want).norm() / want.norm()) <= 1e-6, (name, what)


def _mixed_file(tmp_path) -> Path:
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "mixed.safetensors"
    save_file({f"{name}.lora_up.weight": torch.full((32, 2), 0.1),
               f"{name}.lora_down.weight": torch.full((2, 32), 0.1),
               f"{name}.alpha": torch.tensor(2.0),
               "bundle_emb.sks.string_to_param.*": torch.ones(1, 32),
               "lora_unet_conv_in.boft_R": torch.zeros(1, 2, 2)}, str(path))
    return path


def test_unreadable_kinds_are_named_and_skipped_only_with_partial(tmp_path, tiny_sd1, capsys):
    path = _mixed_file(tmp_path)
    with pytest.raises(LoraError, match=r"bundled textual-inversion embedding.*first key "
                                        r"'bundle_emb\.sks\.string_to_param\.\*'.*PEFT BOFT.*"
                                        r"'lora_unet_conv_in\.boft_R'.*--partial"):
        read_lora(path)
    lora = read_lora(path, partial=True)
    assert len(lora.modules) == 1
    notes = " ".join(lora.notes())
    assert "bundled textual-inversion embedding" in notes and "PEFT BOFT" in notes
    out = tmp_path / "out.safetensors"
    argv = ["lora", "apply", str(tiny_sd1.base), f"{path}:1.0", "-o", str(out), "--dtype", "fp32"]
    args = build_parser("lora").parse_args(argv)
    with pytest.raises(LoraError, match="--partial"):
        args.func(args)
    assert not out.exists()
    args = build_parser("lora").parse_args([*argv, "--partial"])
    assert args.func(args) in (0, None)
    err = capsys.readouterr().err
    assert "skipped 1 key(s) of bundled textual-inversion embedding" in err and "PEFT BOFT" in err
    got = load_pipeline(out, config_folder=tiny_sd1.config_folder).unet
    base = load_pipeline(tiny_sd1.base, config_folder=tiny_sd1.config_folder).unet
    diff = (got.down_blocks[0].attentions[0].proj_in.weight
            - base.down_blocks[0].attentions[0].proj_in.weight).reshape(32, 32)
    assert torch.allclose(diff, torch.full((32, 32), 0.02), atol=1e-6)  # up @ down · 2/2


def test_files_of_no_known_kind_and_peft_bias_are_described(tmp_path):
    path = tmp_path / "emb.safetensors"
    save_file({"bundle_emb.sks.string_to_param.*": torch.ones(1, 32)}, str(path))
    with pytest.raises(LoraError, match=r"bundled textual-inversion embedding "
                                        r"\(kohya bundle_emb\.\*\): first key"):
        read_lora(path, partial=True)  # nothing left to apply
    bias_only = tmp_path / "bias.safetensors"
    save_file({"unet.conv_in.lora_B.bias": torch.ones(32)}, str(bias_only))
    with pytest.raises(LoraError, match=r"lora_B.bias but no lora_A / lora_B"):
        read_lora(bias_only)
    orphan = tmp_path / "orphan.safetensors"
    save_file({"lora_unet_conv_in.rescale": torch.ones(32, 1, 1, 1)}, str(orphan))
    with pytest.raises(LoraError, match=r"'lora_unet_conv_in' has a rescale but no oft_blocks"):
        read_lora(orphan)


def _recipe(fam, lora: Path) -> Recipe:
    return Recipe(arch=fam.arch, method="weighted_sum", vocabulary="mbw",
                  ratios=uniform_ratios(fam.arch, "mbw", 0.4),
                  models={"model1": Source(str(fam.a)), "model2": Source(str(fam.b))},
                  loras=(LoraSpec(str(lora), 0.8),))


def test_comfyui_export_of_weighted_kinds(tmp_path, tiny_sd1):
    fam = tiny_sd1
    src = load_pipeline(fam.a, config_folder=fam.config_folder)
    files = {}
    for kinds in (("glora", "dora_in"), ("ia3_out",), ("oft",), ("dora_out",)):
        tensors, _ = build_lycoris(src, "sd1", kinds)
        files[kinds] = tmp_path / f"{'_'.join(kinds)}.safetensors"
        save_file(tensors, str(files[kinds]))
    tensors, metadata, _ = build_peft_dora(load_pipeline(fam.a, config_folder=fam.config_folder),
                                           "sd1")
    files["peft"] = tmp_path / "peft_dora.safetensors"
    save_file(tensors, str(files["peft"]), metadata)
    for kinds, what in ((("ia3_out",), "IA3"), (("oft",), "OFT"),
                        (("dora_out",), "DoRA normalised per output row"), ("peft", "PEFT DoRA")):
        with pytest.raises(ComfyExportError, match=rf"recipe.loras\[0\].*{what}"):
            comfy_workflow(_recipe(fam, files[kinds]))
    # GLoRA and DoRA per input column: ComfyUI applies them as LyCORIS does
    recipe = _recipe(fam, files[("glora", "dora_in")])
    out = merge_to_file(recipe, tmp_path / "m.safetensors", dtype="fp32").output
    rebuilt = evaluate_workflow(comfy_workflow(recipe).api(),
                                {p.name: p for p in (fam.a, fam.b, files[("glora", "dora_in")])})
    from safetensors.torch import load_file

    exported = load_file(str(out))
    worst = max((rebuilt[k].float() - v).abs().max().item() for k, v in exported.items()
                if k in rebuilt and v.is_floating_point())
    assert worst < 1e-5
