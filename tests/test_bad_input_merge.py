"""Bad input to `mergesearch merge` and `mergesearch lora`, run as a user runs them: a subprocess.

Every case asserts a non-zero exit, one line on stderr that names the file, key or field, no
traceback, an output folder left empty (no output, no partial file) and sources whose bytes
did not change. The bad files are made here by hand, header bytes included.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from search.cli import main

UNET_KEY = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
NAN_KEY = "model.diffusion_model.middle_block.0.in_layers.2.weight"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(*folders: Path) -> dict[Path, str]:
    """sha256 of every regular file under the folders (FIFOs and links are left alone)."""
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[path] = digest(path)
    return out


def cli(*argv, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search.cli", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def case(tiny_sd1, tmp_path):
    """Runs one bad command and checks everything the module docstring promises."""
    bad = tmp_path / "bad"
    bad.mkdir()
    out = tmp_path / "out"
    out.mkdir()

    def run(argv, *needles, output="merged.safetensors"):
        before = snapshot(tiny_sd1.a.parent, bad)
        proc = cli(*argv, *(["-o", out / output] if output else []))
        err = proc.stderr.strip()
        assert proc.returncode != 0, (proc.stdout, err)
        assert "Traceback" not in err, err
        assert len(err.splitlines()) == 1, err  # one line: found before any progress is shown
        assert err.startswith("mergesearch: error: "), err
        for needle in needles:
            assert str(needle) in err, (needle, err)
        assert os.listdir(out) == [], os.listdir(out)  # no output, no partial file
        assert snapshot(tiny_sd1.a.parent, bad) == before
        return err

    run.fam, run.bad, run.out = tiny_sd1, bad, out
    return run


# ------------------------------------------------------------------ hand-made files


def write_raw(path: Path, header: bytes | dict, data: bytes = b"") -> Path:
    """A safetensors-shaped file from raw parts: 8-byte length, header bytes, data bytes."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def split_file(path: Path) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors file, read by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def rewrite_header(source: Path, target: Path, edit) -> Path:
    """``source`` with its header edited by ``edit(header)``, the data bytes unchanged."""
    header, data = split_file(source)
    edit(header)
    return write_raw(target, header, data)


def edited_state(source: Path, target: Path, edit) -> Path:
    state = load_file(source)
    edit(state)
    save_file(state, str(target))
    return target


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"])


# ------------------------------------------------------------------ files that are not weights


def test_truncated_file(case):
    bad = case.bad / "trunc.safetensors"
    bad.write_bytes(case.fam.b.read_bytes()[: case.fam.b.stat().st_size // 2])
    case(["merge", "simple", case.fam.a, bad], bad, "truncated")


def test_not_a_safetensors_file(case):
    bad = case.bad / "notes.safetensors"
    bad.write_text("this is a text file, not weights")
    case(["merge", "simple", case.fam.a, bad], bad, "not a safetensors file")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(case, tmp_path):
    marker = tmp_path / "PWNED"
    evil = case.bad / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(str(marker))}}, f)
    case(["merge", "simple", case.fam.a, evil], evil, "weights_only")
    assert not marker.exists()


def test_unsupported_model_named(case):
    lora = case.bad / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(2, 2)},
              str(lora))
    case(["merge", "simple", case.fam.a, lora], "not supported", "looks like a kohya LoRA")


def test_fifo_source_does_not_hang(case):
    fifo = case.bad / "pipe.safetensors"
    os.mkfifo(fifo)
    case(["merge", "simple", case.fam.a, fifo], fifo, "FIFO")  # cli() times out if it hangs


def test_socket_source(case):
    import socket

    path = case.bad / "sock.safetensors"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        case(["merge", "simple", case.fam.a, path], path, "socket")


def test_character_device_source(case):
    case(["merge", "simple", case.fam.a, "/dev/zero"], "/dev/zero", "character device")


def test_symlink_loop_source(case):
    loop = case.bad / "loop.safetensors"
    loop.symlink_to(case.bad / "loop2.safetensors")
    (case.bad / "loop2.safetensors").symlink_to(loop)
    case(["merge", "simple", case.fam.a, loop], loop, "symlink loop")


def test_symlink_loop_output(case):
    loop = case.bad / "loop.safetensors"
    loop.symlink_to(loop)
    case(["merge", "simple", case.fam.a, case.fam.b, "-o", loop], loop, "symlink loop",
         output=None)


# ------------------------------------------------------------------ headers that break the format


def test_two_tensors_share_one_byte_range(case):
    def edit(header):
        first, second = by_offset(header)[:2]
        header[second]["data_offsets"] = header[first]["data_offsets"]
        header[second]["shape"] = header[first]["shape"]
        header[second]["dtype"] = header[first]["dtype"]
    bad = rewrite_header(case.fam.b, case.bad / "shared.safetensors", edit)
    header, _ = split_file(bad)
    second = by_offset(header)[1]
    case(["merge", "simple", case.fam.a, bad, "--ratio", "0.5"], bad, "overlaps", repr(second))


def test_offsets_pointing_into_the_header(case):
    def edit(header):
        key = by_offset(header)[0]
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin - 64, end - 64]
    bad = rewrite_header(case.fam.b, case.bad / "negative.safetensors", edit)
    header, _ = split_file(bad)
    case(["merge", "simple", case.fam.a, bad], bad, repr(by_offset(header)[0]), "data_offsets")


def test_gap_between_tensors(case):
    bad = write_raw(case.bad / "gap.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, bytes(20))
    case(["merge", "simple", case.fam.a, bad], bad, "'b'", "without gaps")


def test_byte_length_is_not_dtype_size_times_shape(case):
    bad = write_raw(case.bad / "length.safetensors", {
        "w": {"dtype": "F16", "shape": [3, 3], "data_offsets": [0, 16]}}, bytes(16))
    case(["merge", "simple", case.fam.a, bad], bad, "'w'", "18 expected")


def test_bytes_after_the_last_tensor(case):
    header, data = split_file(case.fam.b)
    bad = write_raw(case.bad / "appended.safetensors", header, data + b"extra")
    case(["merge", "simple", case.fam.a, bad], bad, "5 byte(s) after the last tensor")


def test_metadata_not_a_mapping(case):
    bad = rewrite_header(case.fam.b, case.bad / "meta.safetensors",
                         lambda h: h.update({"__metadata__": ["format", "pt"]}))
    case(["merge", "simple", case.fam.a, bad], bad, "__metadata__ must map names to strings")


def test_metadata_value_not_a_string(case):
    bad = rewrite_header(case.fam.b, case.bad / "meta2.safetensors",
                         lambda h: h.update({"__metadata__": {"format": {"nested": 1}}}))
    case(["merge", "simple", case.fam.a, bad], bad, "__metadata__")


def test_header_nested_beyond_any_reader(case):
    bad = write_raw(case.bad / "deep.safetensors", b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    case(["merge", "simple", case.fam.a, bad], bad, "nests")


def test_unknown_dtype(case):
    bad = write_raw(case.bad / "dtype.safetensors", {
        "w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}}, bytes(2))
    case(["merge", "simple", case.fam.a, bad], bad, "'w'", "Q4_K")


def test_tensor_named_twice(case):
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    bad = write_raw(case.bad / "twice.safetensors", f'{{"w":{entry},"w":{entry}}}'.encode(),
                    bytes(4))
    case(["merge", "simple", case.fam.a, bad], bad, "'w' twice")


def test_header_length_larger_than_the_limit(case):
    bad = case.bad / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    case(["merge", "simple", case.fam.a, bad], bad, "not a safetensors file")


def test_diffusers_folder_with_a_broken_file(case, tiny_sd1):
    from merge_backend.pipeline import load_pipeline

    folder = case.bad / "pipe"
    load_pipeline(tiny_sd1.a, config_folder=tiny_sd1.config_folder).save_pretrained(folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    header, data = split_file(weights)
    write_raw(weights, header, data + bytes(3))
    case(["merge", "simple", case.fam.a, folder], weights, "after the last tensor")


# ------------------------------------------------------------------ sources that do not fit


def test_sd1_with_sdxl(case, tiny_sdxl):
    case(["merge", "simple", case.fam.a, tiny_sdxl.a], "same architecture",
         "Stable Diffusion XL", "Stable Diffusion 1.x")


def test_model2_missing_a_key(case):
    bad = edited_state(case.fam.b, case.bad / "missing.safetensors", lambda sd: sd.pop(UNET_KEY))
    case(["merge", "simple", case.fam.a, bad], "lacks 1 key", UNET_KEY, bad)


def test_model1_missing_a_key(case):
    # Seen before: 963 of 964 keys written, exit 0, a "note" on stderr.
    bad = edited_state(case.fam.a, case.bad / "missing1.safetensors", lambda sd: sd.pop(UNET_KEY))
    case(["merge", "simple", bad, case.fam.b, "--ratio", "0.5"], "model1", bad, UNET_KEY,
         case.fam.b)


def test_base_missing_a_key(case):
    bad = edited_state(case.fam.base, case.bad / "base.safetensors", lambda sd: sd.pop(UNET_KEY))
    case(["merge", "add-difference", case.fam.a, case.fam.b, bad], "base", bad, UNET_KEY)


def test_shape_mismatch(case):
    key = "model.diffusion_model.out.2.bias"

    def edit(sd):
        sd[key] = torch.zeros(sd[key].numel() + 1)
    bad = edited_state(case.fam.b, case.bad / "shape.safetensors", edit)
    case(["merge", "simple", case.fam.a, bad], "differs in shape", key)


def test_integer_tensor_where_floats_merge(case):
    def edit(sd):
        sd[UNET_KEY] = (sd[UNET_KEY] * 1000).to(torch.int32)
    bad = edited_state(case.fam.b, case.bad / "int.safetensors", edit)
    case(["merge", "simple", case.fam.a, bad, "--ratio", "0.5"], bad, UNET_KEY, "int32")


def test_nan_weights_found_before_writing(case):
    def edit(sd):
        sd[NAN_KEY][0] = float("nan")
    bad = edited_state(case.fam.b, case.bad / "nan.safetensors", edit)
    case(["merge", "simple", case.fam.a, bad, "--ratio", "0.5"], "NaN", NAN_KEY, bad)


def test_inf_weights_in_a_copied_key_of_a_ckpt(case):
    key = "first_stage_model.decoder.conv_out.bias"

    def edit(sd):
        sd[key][-1] = float("inf")
    state = load_file(case.fam.a)
    edit(state)
    bad = case.bad / "inf.ckpt"
    torch.save({"state_dict": state}, bad)  # the .ckpt reader: torch.load(weights_only=True)
    case(["merge", "simple", bad, case.fam.b], "infinite", key, bad)


# ------------------------------------------------------------------ numbers and names


@pytest.mark.parametrize("node,flag,value", [
    ("subtract", "--multiplier", "nan"),
    ("add-difference", "--multiplier", "inf"),
    ("simple", "--clip-multiplier", "-inf"),
    ("simple", "--ratio", "nan"),
])
def test_non_finite_numbers_name_their_flag(case, node, flag, value):
    extra = [case.fam.base] if node == "add-difference" else []
    clip = ["--clip", "subtract"] if flag == "--clip-multiplier" else []
    case(["merge", node, case.fam.a, case.fam.b, *extra, f"{flag}={value}", *clip], flag,
         "not a finite number")


@pytest.mark.parametrize("text,shown", [("IN04: 0.3\nOUT02:\n", "OUT02: null"),
                                        ("OUT02: {a: 1}\n", "OUT02: {'a': 1}"),
                                        ("OUT02: [0.1, 0.2]\n", "OUT02: [0.1, 0.2]"),
                                        ("OUT02: yes\n", "OUT02: True")])
def test_ratios_file_value_that_is_not_a_number_is_named(case, text, shown):
    ratios = case.bad / "ratios.yaml"
    ratios.write_text(text)
    case(["merge", "layers", case.fam.a, case.fam.b, "--vocabulary", "mbw", "--ratios-file",
          ratios], f"{ratios}: {shown} is not a number")


def test_ratios_file_with_nan(case):
    ratios = case.bad / "ratios.yaml"
    ratios.write_text("IN04: .nan\n")
    case(["merge", "layers", case.fam.a, case.fam.b, "--vocabulary", "mbw", "--ratios-file",
          ratios], ratios, "IN04", "not a finite number")


@pytest.mark.parametrize("dtypes,fix", [
    ([], "use --dtype fp32 or"),  # held in fp32 (the default), written in fp16
    (["--dtype", "fp32", "--unet-dtype", "fp16"], "use --unet-dtype fp32 or"),
    (["--unet-dtype", "fp16"], "use --unet-dtype fp32 and --dtype fp32 or"),
])
def test_overflow_while_writing_leaves_nothing(case, dtypes, fix):
    # The one fault only writing can find: values past float16's range. The partial goes, and
    # the message names the precision that overflowed: the file's or the one the UNet is held in.
    case(["merge", "simple", case.fam.a, case.fam.b, "--ratio", "1e30", "--allow-extrapolation",
          "--quiet", *dtypes], "overflows float16", "model.diffusion_model.", fix)


def test_unknown_block_name(case):
    case(["merge", "layers", case.fam.a, case.fam.b, "--ratio", "IN99=0.5", "--vocabulary", "mbw"],
         "IN99", "valid names")


def test_ratio_outside_unit_interval(case):
    case(["merge", "simple", case.fam.a, case.fam.b, "--ratio", "1.2"], "outside [0, 1]",
         "--allow-extrapolation")


def test_output_equal_to_source(case):
    case(["merge", "simple", case.fam.a, case.fam.b, "--overwrite", "-o", case.fam.a],
         "is the model1 source", output=None)


@pytest.mark.parametrize("command", [
    ["merge", "simple", "{pipe}", "{b}"],
    ["lora", "extract", "{pipe}", "{b}", "--rank", "4"],
])
def test_output_inside_a_source_diffusers_folder(case, tiny_sd1, command):
    """-o onto a file of a diffusers-folder source was written (the folder then failed to
    load); a single-file source was already protected."""
    from merge_backend.pipeline import load_pipeline

    pipe = case.bad / "pipe"
    load_pipeline(tiny_sd1.a, config_folder=tiny_sd1.config_folder).save_pretrained(pipe)
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    argv = [a.format(pipe=pipe, b=tiny_sd1.b) for a in command]
    case([*argv, "--overwrite", "-o", weights], str(weights), "inside", output=None)


def test_output_is_a_folder(case):
    folder = case.bad / "taken.safetensors"
    folder.mkdir()
    case(["merge", "simple", case.fam.a, case.fam.b, "--overwrite", "-o", folder], folder,
         "is a folder", output=None)


# ------------------------------------------------------------------ LoRAs


@pytest.fixture(scope="module")
def lora_file(tiny_sd1, tmp_path_factory) -> Path:
    """A real kohya LoRA for the tiny SD1 family."""
    from merge_backend.checkpoint import open_checkpoint
    from merge_backend.lora import save_lora
    from merge_backend.lora.synthetic import random_lora

    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    return save_lora(random_lora(open_checkpoint(tiny_sd1.base), rank=2), path)


def _copied_lora(case, lora_file, name, edit=None) -> Path:
    target = case.bad / name
    if edit is None:
        target.write_bytes(lora_file.read_bytes())
        return target
    return edited_state(lora_file, target, edit)


def test_lora_with_nan(case, lora_file):
    key = next(k for k in load_file(lora_file) if k.endswith("lora_up.weight"))
    bad = _copied_lora(case, lora_file, "nan_lora.safetensors",
                       lambda sd: sd[key].view(-1)[0].fill_(float("nan")))
    case(["lora", "apply", case.fam.a, bad], bad, key, "NaN")


def test_lora_with_integer_weights(case, lora_file):
    key = next(k for k in load_file(lora_file) if k.endswith("lora_down.weight"))

    def edit(sd):
        sd[key] = sd[key].to(torch.int8)
    bad = _copied_lora(case, lora_file, "int_lora.safetensors", edit)
    case(["lora", "apply", case.fam.a, bad], bad, key, "int8")


def test_lora_with_overlapping_tensors(case, lora_file):
    def edit(header):
        first, second = by_offset(header)[:2]
        header[second].update(header[first])
    bad = rewrite_header(lora_file, case.bad / "overlap_lora.safetensors", edit)
    case(["lora", "apply", case.fam.a, bad], bad, "overlaps")


def test_lora_is_a_fifo(case):
    fifo = case.bad / "lora.safetensors"
    os.mkfifo(fifo)
    case(["lora", "apply", case.fam.a, fifo], fifo, "FIFO")


@pytest.mark.parametrize("extra,field", [
    ([":nan"], "strength"),
    (["--te-strength", "inf"], "--te-strength"),
    (["--block-strength", "IN04=nan"], "--block-strength IN04"),
])
def test_lora_strengths_must_be_finite(case, lora_file, extra, field):
    suffix = extra[0] if extra[0].startswith(":") else ""
    flags = [] if suffix else extra
    case(["lora", "apply", case.fam.a, f"{lora_file}{suffix}", *flags], field, "not a finite number")


def test_lora_te_strength_and_base_block_strength_together_are_refused(case, lora_file):
    """Both set the text encoders' strength; te_strength won and BASE was silently ignored."""
    case(["lora", "apply", case.fam.a, lora_file, "--te-strength", "0.5", "--block-strength",
          "BASE=0"], "te_strength (--te-strength)", "block_strengths['BASE']", "give one")


def test_lora_add_refuses_to_replace_an_input(case, lora_file):
    copy = _copied_lora(case, lora_file, "mine.safetensors")
    case(["lora", "add", copy, lora_file, "--overwrite", "-o", copy], copy, "one of the LoRAs",
         output=None)


@pytest.mark.parametrize("output", ["exists", "/proc"])
def test_lora_add_checks_its_output_before_the_svds(lora_file, tmp_path, monkeypatch, capsys,
                                                    output):
    from merge_backend.lora import add

    factorized = []
    real = add.factorize
    monkeypatch.setattr(add, "factorize", lambda *a, **k: factorized.append(1) or real(*a, **k))
    out = tmp_path / "out.safetensors"
    if output == "exists":
        out.write_bytes(b"mine")
    else:
        out = Path("/proc/mergesearch-test.safetensors")
    assert main(["lora", "add", str(lora_file), "--rank", "4", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err if output == "exists" else "cannot write in" in err
    assert factorized == []  # refused before any resize
    if output == "exists":
        assert out.read_bytes() == b"mine"


def test_lora_add_rank_zero(case, lora_file):
    case(["lora", "add", lora_file, "--rank", "0"], "--rank")


def test_lora_extract_model1_missing_a_key(case):
    bad = edited_state(case.fam.a, case.bad / "m1.safetensors", lambda sd: sd.pop(UNET_KEY))
    case(["lora", "extract", bad, case.fam.b, "--rank", "2"], bad, UNET_KEY, case.fam.b)


def test_lora_extract_nan_found_before_the_svds(case):
    def edit(sd):
        sd[NAN_KEY][0] = float("nan")
    bad = edited_state(case.fam.b, case.bad / "nan.safetensors", edit)
    case(["lora", "extract", case.fam.a, bad, "--rank", "2"], bad, NAN_KEY, "NaN")


# ------------------------------------------------------------------ what still works


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_plain_ckpt_loads_through_weights_only(tmp_path, tiny_sd1, zip_format):
    """Both of torch.save's formats: the zip one (PyTorch >= 1.6) and the older one that many
    2022 checkpoints use (which torch.load cannot memory-map)."""
    ckpt = tmp_path / "b.ckpt"
    torch.save({"state_dict": load_file(tiny_sd1.b)}, ckpt,
               _use_new_zipfile_serialization=zip_format)
    out = tmp_path / "m.safetensors"
    assert main(["merge", "simple", str(tiny_sd1.a), str(ckpt), "-o", str(out),
                 "--ratio", "0.5"]) == 0
    w1, w2 = load_file(tiny_sd1.a)[UNET_KEY].float(), load_file(tiny_sd1.b)[UNET_KEY].float()
    torch.testing.assert_close(load_file(out)[UNET_KEY].float(),
                               (0.5 * w1 + 0.5 * w2).half().float())


def test_extrapolation_when_asked(tmp_path, tiny_sd1):
    out = tmp_path / "x.safetensors"
    assert main(["merge", "simple", str(tiny_sd1.a), str(tiny_sd1.b), "--ratio", "1.2",
                 "--allow-extrapolation", "-o", str(out)]) == 0


def test_integer_keys_are_copied_unchanged(tmp_path, tiny_sd1):
    ids = torch.arange(12, dtype=torch.int64).reshape(3, 4) * 7
    a = edited_state(tiny_sd1.a, tmp_path / "a.safetensors",
                     lambda sd: sd.update({"first_stage_model.extra_ids": ids}))
    out = tmp_path / "m.safetensors"
    assert main(["merge", "simple", str(a), str(tiny_sd1.b), "--ratio", "0.5", "--clip", "simple",
                 "--clip-ratio", "0.5", "-o", str(out)]) == 0
    merged = load_file(out)
    assert merged["first_stage_model.extra_ids"].dtype == torch.int64
    assert torch.equal(merged["first_stage_model.extra_ids"], ids)
    w1, w2 = load_file(tiny_sd1.a)[UNET_KEY].float(), load_file(tiny_sd1.b)[UNET_KEY].float()
    torch.testing.assert_close(merged[UNET_KEY].float(), (0.5 * w1 + 0.5 * w2).half().float())


def test_failure_mid_write_leaves_nothing(tmp_path, tiny_sd1, monkeypatch):
    # A failure after writing started (here: the disk "fills") must not leave a partial file.
    from merge_backend import safetensors_io
    real = safetensors_io.stream_safetensors
    calls = {"n": 0}

    def exploding(values):
        for v in values:
            calls["n"] += 1
            if calls["n"] > 5:
                raise OSError("No space left on device")
            yield v

    def patched(target, planned, values, metadata, **kw):
        return real(target, planned, exploding(values), metadata, **kw)
    monkeypatch.setattr("merge_backend.merge_file.stream_safetensors", patched)
    out = tmp_path / "m.safetensors"
    assert main(["merge", "simple", str(tiny_sd1.a), str(tiny_sd1.b), "-o", str(out)]) != 0
    assert not out.exists() and os.listdir(tmp_path) == []
