"""Original <-> diffusers key mapping: bit-exact round trips, agreement with diffusers' own
converters, and every diffusers key mapped exactly once (tiny and full-size topologies)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from merge_backend.architectures import ARCHITECTURES
from merge_backend.naming import (
    KeyMap,
    convert_value,
    key_maps,
    to_diffusers,
    to_original,
    unmapped_original_keys,
)
from merge_backend.pipeline import (
    build_components,
    build_module,
    component_folders,
    load_pipeline,
    write_config_folder,
)


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def fam(request, tiny_sd1, tiny_sd2, tiny_sdxl):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[request.param]


def _config(module):
    config = getattr(module, "config", None)
    return dict(config) if isinstance(config, dict) else None


def _component_keys(arch, component, sd):
    prefix = arch.components[component].prefix
    return {k for k in sd if k.startswith(prefix) and not k.endswith(("position_ids", "logit_scale"))}


def _diffusers_reference(arch, component, module, original):
    """What diffusers' own single-file converters make of ``original`` for this module."""
    if component == "unet":
        return sfu.convert_ldm_unet_checkpoint(original, _config(module))
    if component == "vae":
        return sfu.convert_ldm_vae_checkpoint(original, _config(module))
    te = next(t for t in arch.text_encoders if t.name == component)
    if te.converter == "hf_clip":
        out = sfu.convert_ldm_clip_checkpoint(original)
        out = {k: v for k, v in out.items() if not k.endswith("position_ids")}
    else:
        out = sfu.convert_open_clip_checkpoint(module, original, prefix=te.prefix)
    if not hasattr(module, "text_model") and component != "vae" and component != "unet":
        out = {k.removeprefix("text_model."): v for k, v in out.items()}  # transformers 5 flat CLIP
    return out


def _stored_only(fam, component, module, original) -> set[str]:
    """What SD2 files keep and diffusers does not load: OpenCLIP-H's last layer (SD2 conditions
    on the penultimate one) and the text projection."""
    if fam.arch != "sd2" or component != "te":
        return set()
    last = f"cond_stage_model.model.transformer.resblocks.{module.config.num_hidden_layers}."
    return {k for k in original if k.startswith(last)} | {"cond_stage_model.model.text_projection"}


def _to_diffusers(fam, arch, component, original, module):
    extra = _stored_only(fam, component, module, original)
    if not extra:
        return to_diffusers(arch, component, original, module)
    with pytest.raises(ValueError, match=f"{len(extra)} original key"):
        to_diffusers(arch, component, original, module)
    with pytest.warns(UserWarning, match="no diffusers counterpart"):
        return to_diffusers(arch, component, original, module, strict=False)


def test_round_trip_is_bit_exact(fam):
    arch = ARCHITECTURES[fam.arch]
    original = load_file(fam.base)
    for component, module in build_components(fam.arch, fam.config_folder).items():
        diffusers_sd = _to_diffusers(fam, arch, component, original, module)
        assert set(diffusers_sd) == set(module.state_dict())
        back = to_original(arch, component, diffusers_sd, _config(module))
        expected = _component_keys(arch, component, original)
        assert set(back) == expected - _stored_only(fam, component, module, original), component
        for key, value in back.items():
            assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key


def test_agrees_with_diffusers_converters(fam):
    arch = ARCHITECTURES[fam.arch]
    original = load_file(fam.base)
    for component, module in build_components(fam.arch, fam.config_folder).items():
        ours = _to_diffusers(fam, arch, component, original, module)
        theirs = _diffusers_reference(arch, component, module, original)
        if _stored_only(fam, component, module, original):  # what from_single_file then skips
            last = f"encoder.layers.{module.config.num_hidden_layers}."
            theirs = {k: v for k, v in theirs.items() if not k.startswith(last)}
        assert set(ours) == set(theirs), component
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{component} {key}"


def test_from_single_file_loads_what_we_convert(fam):
    arch = ARCHITECTURES[fam.arch]
    original = load_file(fam.base)
    pipe = load_pipeline(fam.base, config_folder=fam.config_folder)
    for component, folder in component_folders(arch).items():
        module = getattr(pipe, folder)
        ours = _to_diffusers(fam, arch, component, original, module)
        for key, value in module.state_dict().items():
            assert torch.equal(value, ours[key]), f"{component} {key}"


@pytest.mark.parametrize("arch_name", ["sd1", "sd2", "sdxl"])
def test_full_size_names_agree_with_diffusers(arch_name, tmp_path):
    """Real SD1.5 / SD2.1 / SDXL topologies on the meta device: our original names, fed to
    diffusers' converters, give back exactly the module's keys and shapes."""
    arch = ARCHITECTURES[arch_name]
    folder = write_config_folder(arch_name, tmp_path / arch_name, size="full")
    for component, sub in component_folders(arch).items():
        config = json.loads((folder / sub / "config.json").read_text())
        with torch.device("meta"):
            module = build_module(component, config, arch=arch)
        live = module.state_dict()
        maps = key_maps(arch, component, live, config)
        assert len({(km.original, km.index) for km in maps}) == len(maps) == len(live)
        original = to_original(arch, component, live, config)
        theirs = _diffusers_reference(arch, component, module, original)
        assert set(theirs) == set(live), component
        assert all(theirs[k].shape == live[k].shape for k in live), component


def test_sd2_extra_text_encoder_layer_is_reported():
    """SD2 files hold 24 OpenCLIP layers and a text_projection; diffusers keeps 23 and none."""
    arch = ARCHITECTURES["sd2"]
    small = dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    file_te = CLIPTextModel(CLIPTextConfig(num_hidden_layers=3, **small))
    live_te = CLIPTextModel(CLIPTextConfig(num_hidden_layers=2, **small))
    original = to_original(arch, "te", file_te.state_dict())
    original["cond_stage_model.model.text_projection"] = torch.randn(32, 16)
    extra = {k for k in original if ".resblocks.2." in k} | {
        "cond_stage_model.model.text_projection"
    }
    assert (
        len(extra) == 13
    )  # attn in_proj/out_proj, ln_1, ln_2, c_fc, c_proj (w and b) + projection

    with pytest.raises(ValueError, match="resblocks.2"):
        to_diffusers(arch, "te", original, live_te)
    with pytest.warns(UserWarning, match="no diffusers counterpart"):
        ours = to_diffusers(arch, "te", original, live_te, strict=False)
    maps = key_maps(arch, "te", live_te.state_dict())
    assert set(unmapped_original_keys(arch, "te", original, maps)) == extra

    theirs = sfu.convert_open_clip_checkpoint(live_te, original, prefix="cond_stage_model.model.")
    theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    rebuilt = to_original(arch, "te", ours) | {k: original[k] for k in extra}
    assert set(rebuilt) == set(original)
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)


def test_old_sd1_text_encoder_layout_is_accepted(tiny_sd1):
    arch = ARCHITECTURES["sd1"]
    original = load_file(tiny_sd1.base)
    prefix = "cond_stage_model.transformer."
    old = {k.replace(prefix + "text_model.", prefix): v for k, v in original.items()}
    assert not any(k.startswith(prefix + "text_model.") for k in old)
    te = build_components("sd1", tiny_sd1.config_folder)["te"]
    new_sd, old_sd = to_diffusers(arch, "te", original, te), to_diffusers(arch, "te", old, te)
    assert set(new_sd) == set(old_sd)
    assert all(torch.equal(new_sd[k], old_sd[k]) for k in new_sd)


def test_unknown_diffusers_key_names_the_key():
    arch = ARCHITECTURES["sd1"]
    with pytest.raises(ValueError, match="controlnet_cond_embedding.conv_in.weight"):
        key_maps(arch, "unet", ["conv_in.weight", "controlnet_cond_embedding.conv_in.weight"])
    with pytest.raises(ValueError, match="no component"):
        key_maps(arch, "te2", ["text_projection.weight"])


def test_convert_value_transforms():
    qkv = torch.arange(24.0).reshape(6, 4)
    k = KeyMap("k_proj.weight", "in_proj_weight", "chunk", index=1, parts=3)
    assert torch.equal(convert_value(k, qkv), qkv[2:4])
    proj = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(convert_value(KeyMap("a", "b", "transpose"), proj), proj.T)
    conv = torch.arange(6.0).reshape(3, 2, 1, 1)
    assert convert_value(KeyMap("a", "b", "reshape"), conv).shape == (3, 2)
    assert convert_value(KeyMap("a", "b"), conv) is conv
