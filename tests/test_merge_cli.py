"""`mergesearch merge` reproduces ComfyUI's merge nodes on tiny real single files."""

import subprocess
import sys

import comfyui_reference
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge_backend import ARCHITECTURES, block_of, recipe_from_checkpoint
from search.cli import main

UNET_PREFIX = "model.diffusion_model."
LAST_OUT = {"sd1": 11, "sd2": 11, "sdxl": 8}  # the last output block SuperMerger names
TE = {"sd1": ("cond_stage_model.transformer.",), "sd2": ("cond_stage_model.model.",),
      "sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")}


def run(*argv):
    return main([str(a) for a in argv])


def comfy(w1, w2, a, b):
    out = w1.float().clone()
    out *= a
    out += b * w2.float()
    return out


def expected_merge(fam, ratio_of_key, clip=None):
    """Key by key from the formula: UNet by ratio_of_key, text encoders by clip, rest model1."""
    a, b = load_file(fam.a), load_file(fam.b)
    out = {}
    for key, w1 in a.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith(UNET_PREFIX):
            r = ratio_of_key(key)
            out[key] = comfy(w1, b[key], r, 1 - r)
        elif clip is not None and key.startswith(TE[fam.arch]) and not key.endswith("logit_scale"):
            out[key] = clip(w1, b[key])
        else:
            out[key] = w1.float()
    return out


def assert_file_equals(path, expected, dtype=torch.float32):
    got = load_file(path)
    for key, value in expected.items():
        assert got[key].dtype == dtype, key
        assert torch.equal(got[key], value.to(dtype)), key


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def fam(request, tiny_sd1, tiny_sd2, tiny_sdxl):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[request.param]


def test_simple(fam, tmp_path):
    out = tmp_path / "m.safetensors"
    assert run("merge", "simple", fam.a, fam.b, "-o", out, "--ratio", 0.3, "--dtype", "fp32") == 0
    assert_file_equals(out, expected_merge(fam, lambda k: 0.3))


def test_simple_fp16_default(fam, tmp_path):
    out = tmp_path / "m.safetensors"
    assert run("merge", "simple", fam.a, fam.b, "-o", out, "--ratio", 0.6) == 0
    assert_file_equals(out, expected_merge(fam, lambda k: 0.6), torch.float16)


def test_blocks_node(fam, tmp_path):
    out = tmp_path / "m.safetensors"
    run("merge", "blocks", fam.a, fam.b, "-o", out, "--input", 0.2, "--middle", 0.5, "--out", 0.9,
        "--dtype", "fp32")

    def ratio(key):  # ModelMergeBlocks: prefix match; time_embed/label_emb take `input`
        k = key[len(UNET_PREFIX):]
        return 0.5 if k.startswith("middle") else 0.9 if k.startswith("out") else 0.2
    assert_file_equals(out, expected_merge(fam, ratio))


def test_layers_comfy_and_mbw(fam, tmp_path):
    dot = "" if fam.arch == "sdxl" else "."  # ModelMergeSDXL's names carry no trailing dot
    out = tmp_path / "m.safetensors"
    run("merge", "layers", fam.a, fam.b, "-o", out, "--dtype", "fp32",
        "--ratio", f"input_blocks.1{dot}=0.1", "--ratio", "out.=0.0", "--ratio", "time_embed.=0.7")

    def ratio(key):
        k = key[len(UNET_PREFIX):]
        if k.startswith("input_blocks.1."):
            return 0.1
        return 0.0 if k.startswith("out.") else 0.7 if k.startswith("time_embed.") else 1.0
    assert_file_equals(out, expected_merge(fam, ratio))
    # mbw names from a YAML file: IN01 = input_blocks.1, OUT last owns out.*
    last = f"OUT{LAST_OUT[fam.arch]:02d}"
    ratios = tmp_path / "r.yaml"
    ratios.write_text(f"IN01: 0.25\n{last}: 0.5\nM00: 0.0\n")
    out2 = tmp_path / "m2.safetensors"
    run("merge", "layers", fam.a, fam.b, "-o", out2, "--vocabulary", "mbw", "--ratios-file",
        ratios, "--dtype", "fp32")
    n = LAST_OUT[fam.arch]

    def ratio2(key):
        k = key[len(UNET_PREFIX):]
        if k.startswith("input_blocks.1."):
            return 0.25
        if k.startswith((f"output_blocks.{n}.", "out.")):
            return 0.5
        return 0.0 if k.startswith("middle_block.") else 1.0
    assert_file_equals(out2, expected_merge(fam, ratio2))


def test_mbw_default_sets_the_unet_blocks_not_given_and_leaves_the_text_encoders(fam, tmp_path):
    """--default is the ratio of the UNet blocks not given; the text encoders keep model1's
    (BASE 1.0) unless BASE is given, as the README says of every merge without --clip. Without
    --vocabulary, the names given choose it (IN01: mbw), as `--help`'s example has it."""
    out = tmp_path / "m.safetensors"
    assert run("merge", "layers", fam.a, fam.b, "-o", out, "--ratio", "IN01=0.25", "--default",
               "0.3", "--dtype", "fp32") == 0

    def ratio(key):
        return 0.25 if key[len(UNET_PREFIX):].startswith("input_blocks.1.") else 0.3
    assert_file_equals(out, expected_merge(fam, ratio))
    given = tmp_path / "base.safetensors"
    assert run("merge", "layers", fam.a, fam.b, "-o", given, "--vocabulary", "mbw", "--ratio",
               "BASE=0.6", "--default", "0.3", "--dtype", "fp32") == 0
    assert_file_equals(given, expected_merge(fam, lambda key: 0.3,
                                             clip=lambda w1, w2: comfy(w1, w2, 0.6, 0.4)))


def test_subtract_add_and_clip_nodes(fam, tmp_path):
    a, b = load_file(fam.a), load_file(fam.b)
    out = tmp_path / "s.safetensors"
    run("merge", "subtract", fam.a, fam.b, "-o", out, "--multiplier", 0.8, "--dtype", "fp32",
        "--clip", "subtract", "--clip-multiplier", 0.5)
    got = load_file(out)
    for key in got:
        if key.startswith(UNET_PREFIX):
            assert torch.equal(got[key], comfy(a[key], b[key], 0.8, -0.8)), key
        elif key.startswith(TE[fam.arch]) and not key.endswith(("logit_scale", "position_ids")):
            assert torch.equal(got[key], comfy(a[key], b[key], 0.5, -0.5)), key
    out = tmp_path / "add.safetensors"
    run("merge", "add", fam.a, fam.b, "-o", out, "--dtype", "fp32", "--clip", "simple",
        "--clip-ratio", 0.25)
    got = load_file(out)
    for key in got:
        if key.startswith(UNET_PREFIX):
            assert torch.equal(got[key], a[key] + b[key]), key
        elif key.startswith(TE[fam.arch]) and not key.endswith(("logit_scale", "position_ids")):
            assert torch.equal(got[key], comfy(a[key], b[key], 0.25, 0.75)), key
        elif not key.endswith("position_ids"):
            assert torch.equal(got[key], a[key].float()), key


@pytest.mark.parametrize("multiplier,ratio", [(0.8, 0.3), (0.6, 0.25), (0.8, 1.0), (1.0, 0.0),
                                              (0.8, 0.0)])
def test_add_difference_is_the_workflows_node_chain(fam, tmp_path, multiplier, ratio):
    a, b, c = load_file(fam.a), load_file(fam.b), load_file(fam.base)
    out = tmp_path / "ad.safetensors"
    run("merge", "add-difference", fam.a, fam.b, fam.base, "-o", out, "--multiplier", multiplier,
        "--ratio", ratio, "--dtype", "fp32")
    got = load_file(out)
    unet = [key for key in got if key.startswith(UNET_PREFIX)]
    assert len(unet) > 600
    bad = [k for k in unet if not torch.equal(got[k], comfyui_reference.add_difference(
        a[k], b[k], c[k], multiplier, ratio))]
    assert not bad, f"{len(bad)} of {len(unet)} UNet tensors differ, e.g. {bad[:3]}"
    if ratio == 1.0:
        assert all(torch.equal(got[k], a[k]) for k in unet)


def test_metadata_round_trips_recipe(fam, tmp_path):
    out = tmp_path / "m.safetensors"
    run("merge", "blocks", fam.a, fam.b, "-o", out, "--middle", 0.5)
    recipe = recipe_from_checkpoint(out)
    assert recipe.ratios == {"input": 1.0, "middle": 0.5, "out": 1.0}
    assert recipe.models["model1"].sha256 and len(recipe.models["model2"].sha256) == 64
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.title"] == "m"
    if fam.arch == "sdxl":
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
        keys = load_file(out)
        pos = keys["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
        assert torch.equal(pos, torch.arange(77)[None])
    if fam.arch == "sd2":
        # ComfyUI's test (supported_models.SD20): v-prediction when the last output block's
        # norm1.bias has a population std above 0.09; the tiny SD2 family is v-prediction.
        bias = load_file(fam.a)["model.diffusion_model.output_blocks.11.1.transformer_blocks.0."
                                "norm1.bias"]
        assert bias.std(correction=0) > 0.09
        assert meta["modelspec.predict_key"] == "v"
        assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    else:
        assert meta["modelspec.predict_key"] == "epsilon"


def test_every_unet_key_in_exactly_one_block(fam):
    arch = ARCHITECTURES[fam.arch]
    xl = fam.arch == "sdxl"
    counts = {"comfy": 24 if xl else 30, "mbw": 20 if xl else 26, "blocks": 3, "single": 1}
    keys = [k for k in load_file(fam.a) if k.startswith(UNET_PREFIX)]
    from merge_backend import block_names
    for vocab, n in counts.items():
        names = block_names(arch, vocab)
        assert len(names) == n
        owners = {}
        for key in keys:
            owners.setdefault(block_of(arch, vocab, key), []).append(key)
        assert set(owners) <= set(names)
        assert sum(len(v) for v in owners.values()) == len(keys)
        empty = set(names) - set(owners)
        # label_emb exists only in SDXL; BASE is the text encoder
        assert empty <= {"label_emb.", "BASE"}, (vocab, empty)
    # ComfyUI's rule, stated independently: the longest name that prefixes the key
    names = block_names(arch, "comfy")
    for key in keys:
        k = key[len(UNET_PREFIX):]
        matches = [n for n in names if k.startswith(n)]
        assert len(matches) >= 1
        assert block_of(arch, "comfy", key) == max(matches, key=len)


def test_console_script_runs(tiny_sd1, tmp_path):
    out = tmp_path / "m.safetensors"
    proc = subprocess.run([sys.executable, "-m", "search.cli", "merge", "simple", str(tiny_sd1.a),
                           str(tiny_sd1.b), "-o", str(out), "--ratio", "0.5"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()


def test_merged_file_loads_in_diffusers_with_the_expected_weights(fam, tmp_path):
    from merge_backend.naming import to_original
    from merge_backend.pipeline import load_pipeline

    out = tmp_path / "m.safetensors"
    run("merge", "simple", fam.a, fam.b, "-o", out, "--ratio", 0.3, "--dtype", "fp32")
    pipe = load_pipeline(out, config_folder=fam.config_folder)
    arch = ARCHITECTURES[fam.arch]
    loaded = to_original(arch, "unet", pipe.unet.state_dict(), dict(pipe.unet.config))
    expected = expected_merge(fam, lambda k: 0.3)
    assert len(loaded) > 600
    assert all(torch.equal(v, expected[k]) for k, v in loaded.items())


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_diffusers_folder_as_a_source(arch, tiny_sd1, tiny_sd2, tmp_path):
    """A diffusers pipeline folder merges like the single file it was made from (SD1 and SD2
    share a pipeline class: the text encoder's config tells them apart)."""
    from merge_backend import open_checkpoint
    from merge_backend.pipeline import load_pipeline

    fam = {"sd1": tiny_sd1, "sd2": tiny_sd2}[arch]
    folder = tmp_path / "a-diffusers"
    load_pipeline(fam.a, config_folder=fam.config_folder).save_pretrained(folder)
    assert open_checkpoint(folder).arch.name == arch
    from_file, from_folder = tmp_path / "f.safetensors", tmp_path / "d.safetensors"
    run("merge", "simple", fam.a, fam.b, "-o", from_file, "--ratio", 0.4, "--dtype", "fp32")
    run("merge", "simple", folder, fam.b, "-o", from_folder, "--ratio", 0.4, "--dtype", "fp32")
    a, b = load_file(from_file), load_file(from_folder)
    assert set(b) <= set(a)
    assert all(torch.equal(a[k], b[k]) for k in b if k.startswith(UNET_PREFIX))
    assert sum(k.startswith(UNET_PREFIX) for k in b) > 600


def test_tiny_command_writes_a_family(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "t"), "--arch", "sd1"]) == 0
    assert {p.name for p in (tmp_path / "t").glob("*.safetensors")} == {
        "base.safetensors", "finetune_a.safetensors", "finetune_b.safetensors"}


def test_each_command_loads_only_its_module_and_help_lists_all(tiny_sd1, tmp_path):
    """`COMMANDS` is the truth about who defines what: a missing or stale entry fails here."""
    import argparse

    from search import cli

    def commands(parser: argparse.ArgumentParser) -> set[str]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return set(sub.choices)

    assert commands(cli.build_parser()) == set(cli.COMMANDS)
    for command, module in cli.COMMANDS.items():
        defined = {c for c, m in cli.COMMANDS.items() if m == module}
        assert commands(cli.build_parser(command)) == defined
    (tmp_path / "ratios.yaml").write_text("IN00: 0.25\n")
    argv = ["merge", "layers", str(tiny_sd1.a), str(tiny_sd1.b), "-o", str(tmp_path / "m.safetensors"),
            "--vocabulary", "mbw", "--ratios-file", str(tmp_path / "ratios.yaml"), "--quiet"]
    code = (f"import sys; from search.cli import main; assert main({argv!r}) == 0; "
            "print(sorted(m for m in ('optuna', 'pandas', 'open_clip', 'diffusers', 'transformers') "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip().splitlines()[-1]
    assert loaded == "[]"  # a merge runs without the study and scoring stacks
