"""LyCORIS files as users have them (kohya key layout: LoHa incl. Tucker, LoKr full /
decomposed / Tucker, LoCon with a Tucker lora_mid): our apply equals the reference.

The reference is the ``lycoris-lora`` package's ``lycoris.functional`` weight builders; the
files are built from the diffusers pipeline's own module list with kohya's naming rule
(``lora_unet_`` + the module path with '.' -> '_'), so neither side uses our name tables.
Through the live-pipeline apply (the engine's path) and `mergesearch lora apply`, every
applied weight must equal base + strength · reference delta within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from lycoris import functional  # the reference (test dependency only)
from safetensors.torch import save_file

from merge_backend.lora import LoraError, apply_to_pipeline, read_lora
from merge_backend.pipeline import load_pipeline
from search.cli import build_parser

_PREFIX = {"sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
           "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1",
                    "text_encoder_2": "lora_te2"}}


def _divisor(n: int) -> int:
    return next((d for d in (2, 3, 5, 7) if n % d == 0 and n > d), 1)


def _module(kind: str, weight: torch.Tensor, gen: torch.Generator, alpha: float, r: int = 4):
    """(file tensors without the name prefix, reference delta in the weight's shape)."""
    out, inp, *k = weight.shape
    kk = int(torch.tensor(k).prod()) if k else 1

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.1
    t: dict[str, torch.Tensor] = {"alpha": torch.tensor(alpha)}
    if kind == "loha":
        t |= {"hada_w1_a": rnd(out, r), "hada_w1_b": rnd(r, inp * kk),
              "hada_w2_a": rnd(out, r), "hada_w2_b": rnd(r, inp * kk)}
        ref = functional.loha.diff_weight(
            t["hada_w1_b"].reshape(r, inp, *k), t["hada_w1_a"],
            t["hada_w2_b"].reshape(r, inp, *k), t["hada_w2_a"], None, None,
            gamma=alpha / r, backend="torch")
    elif kind == "loha_tucker":
        t |= {"hada_w1_a": rnd(r, out), "hada_w1_b": rnd(r, inp), "hada_t1": rnd(r, r, *k),
              "hada_w2_a": rnd(r, out), "hada_w2_b": rnd(r, inp), "hada_t2": rnd(r, r, *k)}
        ref = functional.loha.diff_weight(
            t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t["hada_t1"],
            t["hada_t2"], gamma=alpha / r, backend="torch")
    elif kind in ("lokr_full", "lokr_decomposed", "lokr_tucker"):
        a, b = _divisor(out), _divisor(inp)
        o2, i2 = out // a, inp // b
        t["lokr_w1"] = rnd(a, b)
        w2 = w2a = w2b = tt = None
        if kind == "lokr_full":
            t["lokr_w2"] = w2 = rnd(o2, i2, *k)
            scale = 1.0
        elif kind == "lokr_decomposed":
            t |= {"lokr_w2_a": rnd(o2, r), "lokr_w2_b": rnd(r, i2 * kk)}
            w2a, w2b = t["lokr_w2_a"], t["lokr_w2_b"].reshape(r, i2, *k)
            scale = alpha / r
        else:
            t |= {"lokr_w2_a": rnd(r, o2), "lokr_w2_b": rnd(r, i2), "lokr_t2": rnd(r, r, *k)}
            w2a, w2b, tt = t["lokr_w2_a"], t["lokr_w2_b"], t["lokr_t2"]
            scale = alpha / r
        ref = functional.lokr.kron_weight(t["lokr_w1"], None, None, w2, w2a, w2b, tt,
                                          scale=scale, backend="torch")
    elif kind == "locon_tucker":
        t |= {"lora_up.weight": rnd(out, r, 1, 1), "lora_mid.weight": rnd(r, r, *k),
              "lora_down.weight": rnd(r, inp, 1, 1)}
        ref = functional.locon.diff_weight(t["lora_down.weight"], t["lora_up.weight"],
                                           t["lora_mid.weight"], gamma=alpha / r,
                                           backend="torch")
    else:
        raise AssertionError(kind)
    return t, ref.reshape(weight.shape)


def _build(pipe, arch: str, kinds: tuple[str, ...], conv_kinds: tuple[str, ...]):
    """A kohya-layout LyCORIS file over every Linear / Conv2d of the pipeline."""
    gen = torch.Generator().manual_seed(0)
    tensors, refs, i = {}, {}, 0
    for comp, prefix in _PREFIX[arch].items():
        for path, mod in getattr(pipe, comp).named_modules():
            if not isinstance(mod, torch.nn.Linear | torch.nn.Conv2d) or "time_emb" in path:
                continue
            w = mod.weight
            conv3 = w.ndim == 4 and w.shape[-1] > 1
            pool = conv_kinds if conv3 else kinds
            kind = pool[i % len(pool)]
            i += 1
            parts, ref = _module(kind, w.detach(), gen, alpha=2.0 + i % 3)
            name = f"{prefix}_{path.replace('.', '_')}"
            tensors |= {f"{name}.{k}": v.contiguous() for k, v in parts.items()}
            refs[(comp, path)] = ref
    return tensors, refs


CASES = {
    "loha": (("loha",), ("loha", "loha_tucker")),
    "lokr": (("lokr_full", "lokr_decomposed"), ("lokr_full", "lokr_decomposed", "lokr_tucker")),
    "locon_tucker": (("loha",), ("locon_tucker",)),
}


@pytest.mark.parametrize("fam_name", ["tiny_sd1", "tiny_sdxl"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lycoris_apply_equals_reference(request, tmp_path, fam_name, case):
    fam = request.getfixturevalue(fam_name)
    arch = fam_name.removeprefix("tiny_")
    base = load_pipeline(fam.base, config_folder=fam.config_folder)
    tensors, refs = _build(base, arch, *CASES[case])
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(path))
    strength = 0.7
    lora = read_lora(path)
    assert lora.arch.name == arch
    live = load_pipeline(fam.base, config_folder=fam.config_folder)
    changed = apply_to_pipeline(live, [(lora, strength)])
    out = tmp_path / "applied.safetensors"
    args = build_parser("lora").parse_args(["lora", "apply", str(fam.base), f"{path}:{strength}",
                                             "-o", str(out), "--dtype", "fp32"])
    assert args.func(args) in (0, None)  # the CLI command (it writes through apply_to_file)
    from_file = load_pipeline(out, config_folder=fam.config_folder)
    checked = 0
    for (comp, mpath), ref in refs.items():
        orig = getattr(base, comp).get_submodule(mpath)
        want = orig.weight.detach().float() + strength * ref
        for pipe, how in ((live, "pipeline"), (from_file, "file")):
            got = getattr(pipe, comp).get_submodule(mpath).weight.detach().float()
            err = (got - want).norm() / want.norm()
            assert err <= 1e-5, f"{how} {comp}.{mpath}: relative error {err:.2e}"
        checked += 1
    assert changed >= len(refs) > 50 and checked == len(refs)


def test_broken_loha_module_is_named(tmp_path, tiny_sd1):
    path = tmp_path / "broken.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.hada_w1_a": torch.ones(4, 2), f"{name}.hada_w1_b": torch.ones(2, 4),
               f"{name}.hada_w2_a": torch.ones(4, 2)}, str(path))
    with pytest.raises(LoraError, match=rf"LoHa module '{name}' lacks hada_w2_b"):
        read_lora(path)


def test_dora_magnitude_without_factors_is_named(tmp_path, tiny_sd1):
    path = tmp_path / "dora.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.dora_scale": torch.ones(32, 1)}, str(path))
    with pytest.raises(LoraError, match=rf"DoRA module '{name}' has a magnitude but no LoRA"):
        read_lora(path)
