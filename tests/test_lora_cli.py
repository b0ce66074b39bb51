"""`mergesearch lora apply|add|extract` end to end on the tiny SD1 family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from merge_backend.checkpoint import open_checkpoint
from merge_backend.lora import LoraError, LoraUse, lora_deltas_for_key, random_lora, read_lora, save_lora
from search.cli import build_parser
from search.cli_lora import parse_lora_arg


def run(argv: list[str]) -> int:
    """The command's own function, so that its errors reach the test as exceptions."""
    args = build_parser(argv[0]).parse_args(argv)
    return args.func(args)


def test_parse_lora_arg():
    assert parse_lora_arg("a.safetensors:0.5") == (__import__("pathlib").Path("a.safetensors"), 0.5)
    assert parse_lora_arg("dir:x/a.safetensors")[1] == 1.0
    assert parse_lora_arg("a.safetensors:-1")[1] == -1.0


def test_a_strength_that_is_not_a_number_is_named(tmp_path):
    """`style.safetensors:0,8` (a comma) where style.safetensors exists: the strength is the
    mistake, not a missing file; a file whose name holds the colon is still read whole."""
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(LoraError, match=r"LORA:STRENGTH '.*style\.safetensors:0,8': the "
                                        r"strength '0,8' is not a number"):
        parse_lora_arg(f"{lora}:0,8")
    odd = tmp_path / "odd:name.safetensors"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)) == (odd, 1.0)
    assert parse_lora_arg(f"{tmp_path}/gone.safetensors:x")[1] == 1.0  # left to the file check


def test_extract_with_a_rank_above_every_module_says_the_rank_it_used(tmp_path, tiny_sd1,
                                                                      capsys):
    """--rank 100000 stores every module at its full rank; the summary said rank 100000."""
    lora = tmp_path / "full.safetensors"
    assert run(["lora", "extract", str(tiny_sd1.a), str(tiny_sd1.base), "-o", str(lora),
                "--rank", "100000", "--svd", "exact", "--quiet"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout: the summary alone
    assert "IN04" not in captured.err  # --quiet: no block table either
    state = load_file(str(lora))
    ranks, full_ranks = [], []
    for key, down in state.items():
        if key.endswith(".lora_down.weight"):
            up = state[key.replace(".lora_down.", ".lora_up.")]
            ranks.append(down.shape[0])
            full_ranks.append(min(up.shape[0], down[0].numel()))  # min(out, in)
    assert ranks == full_ranks  # every module exact, at its full rank
    full = max(full_ranks)
    assert summary["rank"] == 100000 and summary["max_rank"] == full < 100000
    assert f"above every module's full rank (at most {full})" in captured.err


def test_extract_add_apply_on_the_command_line(tmp_path, tiny_sd1, capsys):
    lora = tmp_path / "diff.safetensors"
    assert run(["lora", "extract", str(tiny_sd1.a), str(tiny_sd1.base), "-o", str(lora),
                "--rank", "8", "--svd", "exact"]) == 0
    captured = capsys.readouterr()
    assert "IN04" in captured.err and "overall" in captured.err  # the block table
    summary = json.loads(captured.out)  # stdout: the summary alone, for scripts
    assert summary["rank"] == 8 and 0 < summary["overall_error"] < 1
    assert summary["max_rank"] == 8
    assert all(v.dtype == torch.float16 for v in load_file(str(lora)).values())

    doubled = tmp_path / "doubled.safetensors"
    assert run(["lora", "add", f"{lora}:0.5", f"{lora}:1.5", "-o", str(doubled), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["max_rank"] == 16

    model = tmp_path / "model.safetensors"
    assert run(["lora", "apply", str(tiny_sd1.base), f"{doubled}:0.5", "-o", str(model),
                "--block-strength", "OUT03=0", "--dtype", "fp32", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["changed"] > 0
    made, base = open_checkpoint(model), open_checkpoint(tiny_sd1.base)
    use = LoraUse(read_lora(lora))
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    expect = base.get(key).float() + lora_deltas_for_key([use], key, base.shape(key))
    torch.testing.assert_close(made.get(key), expect, rtol=1e-3, atol=1e-3)


def test_cli_errors_are_value_errors_naming_the_file(tmp_path, tiny_sd1, tiny_sdxl):
    xl = save_lora(random_lora(open_checkpoint(tiny_sdxl.base), rank=2, components=("te1",)),
                   tmp_path / "xl.safetensors")
    with pytest.raises(LoraError, match=r"xl\.safetensors.*Stable Diffusion XL"):
        run(["lora", "apply", str(tiny_sd1.base), str(xl), "-o", str(tmp_path / "o.safetensors")])
    with pytest.raises(LoraError, match="--block-strength 'IN04': write NAME=VALUE"):
        run(["lora", "apply", str(tiny_sd1.base), str(xl), "-o", str(tmp_path / "o.safetensors"),
             "--block-strength", "IN04"])
    with pytest.raises(LoraError, match="not all block names"):
        run(["lora", "apply", str(tiny_sd1.base), str(xl), "-o", str(tmp_path / "o.safetensors"),
             "--block-strength", "IN99=1"])
    with pytest.raises(LoraError, match="is Stable Diffusion XL but"):
        run(["lora", "extract", str(tiny_sdxl.a), str(tiny_sd1.base), "-o",
             str(tmp_path / "e.safetensors"), "--rank", "4"])
    assert not list(tmp_path.glob("o.safetensors")) and not list(tmp_path.glob("e.safetensors"))
