"""The tiny families: deterministic bytes, real layouts, offline loading, documented changes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from merge_backend.architectures import ARCHITECTURES, detect_architecture
from merge_backend.pipeline import empty_pipeline, load_pipeline, write_config_folder
from merge_backend.pipeline_configs import config_files
from merge_backend.tiny import write_tiny_family

UNET_PREFIX = "model.diffusion_model."
FINETUNE_BLOCKS = {"finetune_a": ("input_blocks.",), "finetune_b": ("output_blocks.",)}
NOT_MERGED = ("position_ids", "logit_scale")  # left as they are by the fine-tunes


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def fam(request, tiny_sd1, tiny_sd2, tiny_sdxl):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[request.param]


def _generate(pipe, steps: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        ["a red apple", "a blue car"],
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=generator,
        output_type="pt",
    )
    return out.images


def test_same_seed_same_bytes(tmp_path, tiny_sd1):
    again = write_tiny_family(tmp_path / "again", "sd1", seed=0)
    for name, path in tiny_sd1.files.items():
        assert path.read_bytes() == again.files[name].read_bytes(), name
    other = write_tiny_family(tmp_path / "other", "sd1", seed=1)
    assert other.base.read_bytes() != tiny_sd1.base.read_bytes()


def test_layout_is_detected(fam):
    for path in fam.files.values():
        sd = load_file(path)
        assert detect_architecture(sd, source=str(path)).name == fam.arch
        assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
        assert any(k.startswith("first_stage_model.decoder.") for k in sd)


def test_finetunes_differ_exactly_in_documented_blocks(fam):
    arch = ARCHITECTURES[fam.arch]
    base = load_file(fam.base)
    te_prefixes = tuple(te.prefix for te in arch.text_encoders)
    for name, path in (("finetune_a", fam.a), ("finetune_b", fam.b)):
        tuned = load_file(path)
        assert set(tuned) == set(base)
        for key, value in base.items():
            unet_block = key.startswith(UNET_PREFIX) and key[len(UNET_PREFIX) :].startswith(
                FINETUNE_BLOCKS[name]
            )
            text = key.startswith(te_prefixes) and not key.endswith(NOT_MERGED)
            assert torch.equal(tuned[key], value) != (unet_block or text), f"{name} {key}"
        te_delta = max(
            (tuned[k] - base[k]).abs().max().item()
            for k in base
            if k.startswith(te_prefixes) and base[k].is_floating_point()
        )
        unet_delta = max(
            (tuned[k] - base[k]).abs().max().item() for k in base if k.startswith(UNET_PREFIX)
        )
        assert te_delta < unet_delta  # the text encoder moves only slightly


def test_loads_offline_and_generates(fam):
    pipe = load_pipeline(fam.base, config_folder=fam.config_folder)
    images = _generate(pipe)
    assert images.shape == (2, 3, 64, 64)
    assert torch.isfinite(images).all() and images.std() > 0
    tuned = _generate(load_pipeline(fam.a, config_folder=fam.config_folder))
    assert not torch.equal(tuned, images)


def test_load_without_config_folder_uses_cached_tiny_config(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESEARCH_CACHE", str(tmp_path))
    pipe = load_pipeline(tiny_sd1.b)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert (tmp_path / "configs" / "sd1-tiny" / "model_index.json").is_file()
    assert list(pipe.unet.config.block_out_channels) == [32, 32, 64, 64]


def test_empty_pipeline_generates(fam):
    pipe = empty_pipeline(fam.arch, "tiny", config_folder=fam.config_folder)
    assert torch.isfinite(_generate(pipe, steps=2)).all()


def test_config_folder_is_idempotent_and_tokenizer_matches_open_clip(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    folder = write_config_folder("sdxl", tmp_path / "xl", size="full")
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    write_config_folder("sdxl", folder, size="full")
    assert stamps == {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"

    text = "A photo of an astronaut riding a horse, highly detailed!"
    ids = CLIPTokenizer.from_pretrained(folder / "tokenizer")(text).input_ids
    reference = SimpleTokenizer()
    assert ids == [49406, *reference.encode(text), 49407]
    padded = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")(
        text, padding="max_length"
    ).input_ids
    assert len(padded) == 77 and padded[-1] == 0  # tokenizer_2 pads with "!" (id 0)


@pytest.mark.parametrize("arch_name", ["sd1", "sd2", "sdxl"])
def test_full_configs_are_the_public_models(arch_name):
    """Parameter counts of the public SD1.5 / SD2.1 / SDXL base components."""
    from merge_backend.pipeline import build_module

    expected = {
        "sd1": {"unet": 859_520_964, "te": 123_060_480},
        "sd2": {"unet": 865_910_724, "te": 340_387_840},
        "sdxl": {"unet": 2_567_463_684, "te1": 123_060_480, "te2": 694_659_840},
    }[arch_name]
    expected["vae"] = 83_653_863
    files = config_files(arch_name, "full")
    arch = ARCHITECTURES[arch_name]
    folders = {
        "unet": "unet",
        "vae": "vae",
        **{te.name: te.folder for te in arch.text_encoders},
    }
    for component, count in expected.items():
        with torch.device("meta"):
            module = build_module(component, files[f"{folders[component]}/config.json"], arch=arch)
        assert sum(p.numel() for p in module.parameters()) == count, component


@pytest.mark.gpu
def test_loads_and_generates_on_gpu_in_fp16(fam):
    pipe = load_pipeline(fam.base, config_folder=fam.config_folder, device="cuda",
                         dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.unet.device.type == "cuda"
    assert torch.isfinite(_generate(pipe)).all()
    empty = empty_pipeline(fam.arch, "tiny", "cuda", torch.float16, config_folder=fam.config_folder)
    assert torch.isfinite(_generate(empty)).all()


def test_the_tiny_command_never_replaces_a_users_file_unasked(tmp_path, capsys):
    """A checkpoint of the family's names already in the folder (here: the user's own bytes)
    stops `mergesearch tiny` before it writes anything; --overwrite replaces the family."""
    from search.cli import main

    (tmp_path / "finetune_b.safetensors").write_bytes(b"the user's own model")
    assert main(["tiny", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'finetune_b.safetensors'} exists" in err and "--overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune_b.safetensors"]
    assert (tmp_path / "finetune_b.safetensors").read_bytes() == b"the user's own model"
    assert main(["tiny", str(tmp_path), "--overwrite"]) == 0
    expected = write_tiny_family(tmp_path / "fresh", "sd1", seed=0)
    assert (tmp_path / "finetune_b.safetensors").read_bytes() == expected.b.read_bytes()
