"""Extraction defaults (issue 18): a LoRA baked into a fine-tune comes back out under the
default settings of `lora extract`, `lora add --rank` and `export --to lora`; modules the two
models hold unchanged are skipped; the clamp is one flag with one default on all three.

The baked LoRA is built here, in the original layout (W + up @ down on chosen weights), and
the files written are read back by hand (up @ down · alpha / r per module, matched to the baked
deltas by value), so no name table or LoRA reader of the project is the oracle.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_backend import ARCHITECTURES, Recipe, Source
from merge_backend.recipe import uniform_ratios
from search.cli import build_parser, main

RANK = 8
UNET = "model.diffusion_model."
# attention, feed-forward and a 3x3 resnet conv: what a typical LoRA trains, in original names
PICKED = (".attn1.to_q.", ".attn2.to_v.", ".proj_in.", ".ff.net.2.", ".in_layers.2.")


def bake(base, out, seed: int = 18) -> dict[str, torch.Tensor]:
    """Write base + a rank-8 delta on the PICKED UNet weights to ``out``; key -> delta."""
    state = load_file(str(base))
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for key in sorted(state):
        w = state[key]
        if key.startswith(UNET) and w.ndim >= 2 and any(p in key for p in PICKED):
            up = torch.randn(w.shape[0], RANK, generator=gen)
            down = torch.randn(RANK, w[0].numel(), generator=gen)
            delta = (up @ down).reshape(w.shape)
            delta *= 0.05 * w.pow(2).mean().sqrt() / delta.pow(2).mean().sqrt()
            state[key] = w + delta
            deltas[key] = delta
    save_file(state, str(out))
    assert len(deltas) > 20 and any(d.ndim == 4 and d.shape[-1] == 3 for d in deltas.values())
    return deltas


def products(path) -> list[torch.Tensor]:
    """Every module's up @ down · alpha / r of a kohya file, as (out, in·k·k) float32."""
    tensors = load_file(str(path))
    out = []
    for key, up in tensors.items():
        if key.endswith(".lora_up.weight"):
            name = key.removesuffix(".lora_up.weight")
            up = up.float().flatten(1)
            down = tensors[f"{name}.lora_down.weight"].float().flatten(1)
            alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else up.shape[1]
            out.append(up @ down * (alpha / up.shape[1]))
    return out


def recovery(path, deltas: dict[str, torch.Tensor]) -> float:
    """||LoRA - baked|| / ||baked||, each baked delta matched to the file's closest product;
    the file must hold exactly one module per baked delta (unchanged modules skipped)."""
    found = products(path)
    assert len(found) == len(deltas), "one module per changed weight, none for unchanged ones"
    err = norm = 0.0
    used = set()
    for delta in deltas.values():
        want = delta.flatten(1)
        dist = [(w - want).double().pow(2).sum().item() if w.shape == want.shape else math.inf
                for w in found]
        best = min(range(len(found)), key=dist.__getitem__)
        assert best not in used
        used.add(best)
        err += dist[best]
        norm += want.double().pow(2).sum().item()
    return math.sqrt(err / norm)


def unet_weights(path) -> int:
    """LoRA-able UNet weights of a file: its 2-D and 4-D UNet tensors (Linear / Conv2d)."""
    return sum(1 for k, v in load_file(str(path)).items() if k.startswith(UNET) and v.ndim >= 2)


@pytest.fixture(params=["sd1", "sdxl"])
def baked(request, tmp_path_factory, tiny_sd1, tiny_sdxl):
    fam = {"sd1": tiny_sd1, "sdxl": tiny_sdxl}[request.param]
    path = tmp_path_factory.mktemp(f"baked_{request.param}") / "baked.safetensors"
    return fam, path, bake(fam.base, path)


@pytest.mark.parametrize("rank", [8, 16])
def test_extract_recovers_a_baked_lora_with_default_settings(baked, rank, tmp_path, capsys):
    fam, path, deltas = baked
    out = tmp_path / "x.safetensors"
    assert main(["lora", "extract", str(path), str(fam.base), "-o", str(out), "--rank",
                 str(rank)]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    assert recovery(out, deltas) <= 1e-3
    skipped = unet_weights(fam.base) - len(deltas)
    assert summary["modules"] == len(deltas) and summary["skipped_unchanged"] == skipped
    assert f"skipped {skipped} unchanged module(s)" in printed.err  # under the block table
    assert all(v.dtype == torch.float16 for v in load_file(str(out)).values())  # default dtype


def test_clamp_flag_reaches_extract_and_add(baked, tmp_path, capsys):
    fam, path, deltas = baked
    clamped, exact = tmp_path / "c.safetensors", tmp_path / "e.safetensors"
    common = [str(path), str(fam.base), "--rank", "16", "--quiet"]
    assert main(["lora", "extract", *common, "-o", str(clamped), "--clamp", "0.99"]) == 0
    assert main(["lora", "extract", *common, "-o", str(exact), "--no-clamp", "--dtype",
                 "fp32"]) == 0
    assert recovery(clamped, deltas) > 1e-2  # ComfyUI's / kohya's clamp: far from the LoRA
    assert recovery(exact, deltas) < 1e-5
    # lora add --rank resizes with the same default and the same flag
    resized, resized_clamped = tmp_path / "r.safetensors", tmp_path / "rc.safetensors"
    assert main(["lora", "add", str(exact), "--rank", "8", "-o", str(resized), "--quiet"]) == 0
    assert main(["lora", "add", str(exact), "--rank", "8", "-o", str(resized_clamped), "--quiet",
                 "--clamp", "0.99"]) == 0
    capsys.readouterr()
    assert recovery(resized, deltas) <= 1e-3
    assert recovery(resized_clamped, deltas) > 1e-2
    assert main(["lora", "add", str(exact), "-o", str(tmp_path / "x.safetensors"),
                 "--clamp", "0.9"]) == 1  # an exact add makes no factors to clip
    assert "--rank" in capsys.readouterr().err


def test_export_to_lora_recovers_and_prints_per_block_error(tiny_sd1, tmp_path, capsys):
    path = tmp_path / "baked.safetensors"
    deltas = bake(tiny_sd1.base, path)
    recipe = Recipe(arch="sd1", method="weighted_sum", vocabulary="mbw",
                    ratios=uniform_ratios("sd1", "mbw", 1.0),  # the merge is model1: the bake
                    models={"model1": Source(str(path)), "model2": Source(str(tiny_sd1.base))})
    source = tmp_path / "best.json"
    source.write_text(recipe.to_json())
    out = tmp_path / "best.lora.safetensors"
    assert main(["export", str(source), "--to", "lora", "--base", str(tiny_sd1.base),
                 "--rank", "8", "-o", str(out)]) == 0
    printed = capsys.readouterr()
    json.loads(printed.out)  # stdout stays the JSON list of written files
    error = recovery(out, deltas)
    assert error <= 1e-3
    rows = dict(re.findall(r"^(IN\d\d|OUT\d\d|M00|overall) .* (\S+)$", printed.err, re.M))
    assert {"IN01", "M00", "OUT11", "overall"} <= rows.keys()
    assert float(rows["overall"]) == pytest.approx(error, rel=2e-2)  # printed to 4 digits
    # the text encoders are unchanged too: every module but the baked ones is skipped
    te = sum(1 for k, v in load_file(str(tiny_sd1.base)).items()
             if k.startswith("cond_stage_model.") and v.ndim >= 2 and v.is_floating_point()
             and "embedding" not in k)
    skipped = unet_weights(tiny_sd1.base) - len(deltas) + te
    assert f"skipped {skipped} unchanged module(s)" in printed.err
    assert main(["export", str(source), "--to", "lora", "--base", str(tiny_sd1.base), "--rank",
                 "8", "-o", str(tmp_path / "c.safetensors"), "--clamp", "0.99"]) == 0
    assert recovery(tmp_path / "c.safetensors", deltas) > 1e-2


COMMANDS = {
    "extract": ["lora", "extract", "a.safetensors", "b.safetensors", "-o", "x", "--rank", "8"],
    "add": ["lora", "add", "a.safetensors", "-o", "x", "--rank", "8"],
    "export": ["export", "run", "--to", "lora", "--base", "b.safetensors"],
}


def test_clamp_flags_exist_and_agree_on_all_three_commands():
    def parse(argv):
        return build_parser(argv[0]).parse_args(argv).clamp

    defaults = {name: parse(argv) for name, argv in COMMANDS.items()}
    assert len(set(defaults.values())) == 1, defaults  # one default
    for name, argv in COMMANDS.items():
        assert parse([*argv, "--clamp", "0.9"]) == 0.9, name
        assert parse([*argv, "--no-clamp"]) is None, name
        with pytest.raises(SystemExit):
            parse([*argv, "--clamp", "0.9", "--no-clamp"])


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_clamp_outside_zero_one_is_refused_before_work(value, tiny_sd1, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["lora", "extract", str(tiny_sd1.a), str(tiny_sd1.base), "-o", str(out),
                 "--rank", "4", "--clamp", value]) == 1
    assert f"--clamp {float(value)}" in capsys.readouterr().err and not out.exists()


def test_identical_models_are_refused(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    assert main(["lora", "extract", str(tiny_sd1.base), str(tiny_sd1.base), "-o", str(out),
                 "--rank", "4"]) == 1
    assert "no difference to extract" in capsys.readouterr().err and not out.exists()


def test_only_the_changed_part_of_a_fused_qkv_weight_is_written(tiny_sdxl, tmp_path, capsys):
    # OpenCLIP-G stores q, k and v in one in_proj_weight; change q only
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    state = load_file(str(tiny_sdxl.base))
    d = state[key].shape[0] // 3
    gen = torch.Generator().manual_seed(5)
    delta = 0.01 * torch.randn(d, RANK, generator=gen) @ torch.randn(RANK, d, generator=gen)
    state[key][:d] += delta
    path, out = tmp_path / "q.safetensors", tmp_path / "x.safetensors"
    save_file(state, str(path))
    assert main(["lora", "extract", str(path), str(tiny_sdxl.base), "-o", str(out), "--rank",
                 "8", "--text-encoder", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["modules"] == 1
    assert recovery(out, {key: delta}) <= 1e-3


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
@pytest.mark.parametrize("arch", ["flux1", "sd35_medium"])
def test_an_architecture_with_fused_qkv_is_refused_naming_it(arch, fmt, request, tmp_path,
                                                             capsys):
    """Flux.1 and SD3.x hold q, k and v in one tensor (and Flux its q/k norms as `.scale`),
    which neither format names here: the refusal names the file, the architecture and the
    first module, and nothing is written (it was `kohya has no name for
    transformer_blocks.0.attn.to_q`, after reading both models)."""
    fam = request.getfixturevalue(f"tiny_{arch}")
    out = tmp_path / "x.safetensors"
    assert main(["lora", "extract", str(fam.a), str(fam.base), "-o", str(out), "--rank", "4",
                 "--format", fmt]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"mergesearch: error: {fam.a}: a {fmt}-format LoRA has no name for")
    assert f"of {ARCHITECTURES[arch].title}'s modules" in err
    if fmt == "kohya":  # kohya spells original paths: the fused qkv is what it cannot name
        assert "a part of a fused tensor" in err and "qkv" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
