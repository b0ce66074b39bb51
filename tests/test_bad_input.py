"""Bad input ends with a clear message and a non-zero exit, writes nothing, changes no source."""

import hashlib
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from search.cli import main


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sources(tiny_sd1, tmp_path):
    return tiny_sd1, {p: digest(p) for p in tiny_sd1.files.values()}


def fails(capsys, tmp_path, sources, argv, *needles):
    fam, before = sources
    out = tmp_path / "out.safetensors"
    rc = main([str(a) for a in argv] + ["-o", str(out)])
    err = capsys.readouterr().err
    assert rc != 0
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial file
    assert {p: digest(p) for p in before} == before
    return err


def test_truncated_file(capsys, tmp_path, sources):
    fam, _ = sources
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(fam.b.read_bytes()[: fam.b.stat().st_size // 2])
    fails(capsys, tmp_path, sources, ["merge", "simple", fam.a, bad], str(bad), "truncated")


def test_not_a_safetensors_file(capsys, tmp_path, sources):
    fam, _ = sources
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is a text file, not weights")
    fails(capsys, tmp_path, sources, ["merge", "simple", fam.a, bad], str(bad),
          "not a safetensors file")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(capsys, tmp_path, sources):
    fam, _ = sources
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(str(marker))}}, f)
    fails(capsys, tmp_path, sources, ["merge", "simple", fam.a, evil], str(evil), "weights_only")
    assert not marker.exists()


def test_plain_ckpt_loads_through_weights_only(tmp_path, tiny_sd1):
    ckpt = tmp_path / "b.ckpt"
    torch.save({"state_dict": load_file(tiny_sd1.b)}, ckpt)
    out = tmp_path / "m.safetensors"
    assert main(["merge", "simple", str(tiny_sd1.a), str(ckpt), "-o", str(out),
                 "--ratio", "0.5"]) == 0


def test_sd1_with_sdxl(capsys, tmp_path, sources, tiny_sdxl):
    fam, _ = sources
    fails(capsys, tmp_path, sources, ["merge", "simple", fam.a, tiny_sdxl.a],
          "same architecture", "Stable Diffusion XL", "Stable Diffusion 1.x")


def _edited(tmp_path, path, name, edit):
    sd = load_file(path)
    edit(sd)
    out = tmp_path / name
    save_file(sd, str(out))
    return out


def test_missing_keys(capsys, tmp_path, sources):
    fam, _ = sources
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    bad = _edited(tmp_path, fam.b, "missing.safetensors", lambda sd: sd.pop(key))
    fails(capsys, tmp_path, sources, ["merge", "simple", fam.a, bad], "lacks 1 key", key)


def test_shape_mismatch(capsys, tmp_path, sources):
    fam, _ = sources
    key = "model.diffusion_model.out.2.bias"

    def edit(sd):
        sd[key] = torch.zeros(sd[key].numel() + 1)
    bad = _edited(tmp_path, fam.b, "shape.safetensors", edit)
    fails(capsys, tmp_path, sources, ["merge", "simple", fam.a, bad], "differs in shape", key)


def test_nan_weights(capsys, tmp_path, sources):
    fam, _ = sources
    key = "model.diffusion_model.middle_block.0.in_layers.2.weight"

    def edit(sd):
        sd[key][0] = float("nan")
    bad = _edited(tmp_path, fam.b, "nan.safetensors", edit)
    fails(capsys, tmp_path, sources, ["merge", "simple", fam.a, bad, "--ratio", "0.5"],
          "NaN", key, str(bad))


def test_unknown_block_name(capsys, tmp_path, sources):
    fam, _ = sources
    fails(capsys, tmp_path, sources, ["merge", "layers", fam.a, fam.b, "--ratio", "IN99=0.5",
                                       "--vocabulary", "mbw"], "IN99", "valid names")


def test_ratio_outside_unit_interval(capsys, tmp_path, sources):
    fam, _ = sources
    fails(capsys, tmp_path, sources, ["merge", "simple", fam.a, fam.b, "--ratio", "1.2"],
          "outside [0, 1]", "--allow-extrapolation")
    out = tmp_path / "x.safetensors"
    assert main(["merge", "simple", str(fam.a), str(fam.b), "--ratio", "1.2",
                 "--allow-extrapolation", "-o", str(out)]) == 0
    out.unlink()


def test_output_equal_to_source(capsys, tmp_path, sources):
    fam, before = sources
    rc = main(["merge", "simple", str(fam.a), str(fam.b), "-o", str(fam.a)])
    assert rc != 0 and "is the model1 source" in capsys.readouterr().err
    assert {p: digest(p) for p in before} == before


def test_unsupported_model_named(capsys, tmp_path, sources):
    fam, _ = sources
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(2, 2)},
              str(lora))
    fails(capsys, tmp_path, sources, ["merge", "simple", fam.a, lora], "not supported",
          "looks like a kohya LoRA")


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
