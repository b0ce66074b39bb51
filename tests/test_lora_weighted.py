"""Weight-dependent LoRA formats as their writers save them — DoRA (LyCORIS/kohya
``dora_scale``, PEFT ``lora_magnitude_vector``), OFT, BOFT, IA3, GLoRA: our apply equals the
writer's own merged weight.

Files are built with the writers' own code over every Linear / Conv2d of a tiny pipeline:
the ``lycoris-lora`` package's modules (state dicts under kohya's ``lora_unet_<path>`` names)
and PEFT's ``get_peft_model`` with ``use_dora``. The reference is that same code's merged
weight: LyCORIS ``get_merged_weight`` / PEFT ``merge``, computed on the weight the LoRA meets
(the base, or the merged candidate). At strength s the expected weight is
``W + s · (F(W) − W)`` (ComfyUI's rule; F = the reference's merged weight at strength 1).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_backend import merge_to_file, open_checkpoint
from merge_backend.engine import MergeEngine
from merge_backend.lora import LoraError, apply_to_pipeline, random_lora, read_lora, save_lora
from merge_backend.pipeline import load_pipeline
from merge_backend.recipe import LoraSpec, Recipe, Source, uniform_ratios
from search.cli import build_parser

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")  # the plain torch formulas on CPU
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402 - the reference (test dep)
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402
from lycoris.modules.glora import GLoRAModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

_PREFIX = {"sd1": {"unet": "lora_unet", "text_encoder": "lora_te"},
           "sd2": {"unet": "lora_unet", "text_encoder": "lora_te"},
           "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1",
                    "text_encoder_2": "lora_te2"},
           # DiTs: the transformer, kohya-style diffusers paths (SimpleTuner, OneTrainer)
           "flux1": {"transformer": "lora_transformer"},
           "sd35_medium": {"transformer": "lora_transformer"}}
_PEFT_PREFIX = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}

# LyCORIS kinds: (module class, constructor arguments)
KINDS = {
    "dora_out": (LoConModule, {"lora_dim": 4, "alpha": 2.0, "weight_decompose": True}),
    "dora_in": (LoConModule, {"lora_dim": 4, "alpha": 3.0, "weight_decompose": True,
                              "wd_on_out": False}),
    "doha": (LohaModule, {"lora_dim": 4, "alpha": 2.0, "weight_decompose": True}),
    "dokr": (LokrModule, {"lora_dim": 4, "alpha": 2.0, "weight_decompose": True,
                          "wd_on_out": False, "decompose_both": True}),
    "oft": (DiagOFTModule, {"lora_dim": 4, "constraint": 0.0}),
    "oft_constrained_rescaled": (DiagOFTModule, {"lora_dim": 4, "constraint": 0.005,
                                                 "rescaled": True}),
    "boft": (ButterflyOFTModule, {"lora_dim": 4, "constraint": 0.0, "rescaled": True}),
    "ia3_out": (IA3Module, {}),
    "ia3_in": (IA3Module, {"train_on_input": True}),
    "glora": (GLoRAModule, {"lora_dim": 4, "alpha": 2.0}),
}
CASES = {"dora": ("dora_out", "dora_in", "doha", "dokr"), "oft": ("oft", "oft_constrained_rescaled"),
         "boft": ("boft",), "ia3": ("ia3_out", "ia3_in"), "glora": ("glora",),
         "mixed": tuple(KINDS)}


def _targets(pipe, arch: str):
    for comp in _PREFIX[arch]:
        for path, mod in getattr(pipe, comp).named_modules():
            if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d) and "time_emb" not in path \
                    and not (arch == "sd35_medium" and path == _SD35_TINY_LAST):
                yield comp, path, mod


# The name tables are built from the full-size configs (24 blocks): in the tiny SD3.5 the 4th
# block is the last, whose context AdaLayerNorm diffusers stores swapped; no real file has it.
_SD35_TINY_LAST = "transformer_blocks.3.norm1_context.linear"


def _randomise(module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("org_"):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if name in ("dora_scale", "rescale"):
                p.mul_(1 + 0.1 * noise) if name == "dora_scale" else p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def build_lycoris(pipe, arch: str, kinds: tuple[str, ...], seed: int = 0):
    """(kohya-layout file tensors, {(component, path): LyCORIS module}) over the pipeline."""
    gen = torch.Generator().manual_seed(seed)
    tensors, modules = {}, {}
    for i, (comp, path, mod) in enumerate(_targets(pipe, arch)):
        name = f"{_PREFIX[arch][comp]}_{path.replace('.', '_')}"
        cls, kwargs = KINDS[kinds[i % len(kinds)]]
        try:
            module = cls(name, mod, **kwargs)
        except (ValueError, AssertionError):  # a width BOFT cannot factor: plain diag-OFT
            module = DiagOFTModule(name, mod, lora_dim=4, constraint=0.0)
        _randomise(module, gen)
        tensors |= {f"{name}.{k}": v.detach().clone().contiguous()
                    for k, v in module.state_dict().items()}
        modules[(comp, path)] = module
    return tensors, modules


def lycoris_reference(module, weight: torch.Tensor) -> torch.Tensor:
    """The LyCORIS module's merged weight (strength 1) when its layer holds ``weight``."""
    org = module.org_module[0]
    keep = org.weight.detach().clone()
    with torch.no_grad():
        org.weight.copy_(weight)
        if isinstance(module, LohaModule | LokrModule):
            # the module's forward: get_weight (scaled by alpha/r once); lycoris-lora 4.1.3's
            # get_diff_weight / get_merged_weight scale a second time (not what it trains)
            out = org.weight + module.get_weight(tuple(org.weight.shape))
            out = module.apply_weight_decompose(out) if module.wd else out
        elif isinstance(module, IA3Module | GLoRAModule):
            out = org.weight + module.get_diff_weight(1.0)[0].reshape(org.weight.shape)
        else:
            out = module.get_merged_weight(1.0)[0].reshape(org.weight.shape)
        out = out.detach().float().clone()
        org.weight.copy_(keep)
    return out


def build_peft_dora(pipe, arch: str, seed: int = 0):
    """A PEFT DoRA file as diffusers saves it (``unet.<path>.lora_A.weight``,
    ``…lora_magnitude_vector``, lora_alpha in the ``lora_adapter_metadata`` field), its
    metadata and the wrapped layers for the reference."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    gen = torch.Generator().manual_seed(seed)
    tensors, layers, meta = {}, {}, {}
    for comp in _PREFIX[arch]:
        module = getattr(pipe, comp)
        names = [p for c, p, _ in _targets(pipe, arch) if c == comp]
        config = LoraConfig(r=4, lora_alpha=3, target_modules=names, use_dora=True)
        wrapped = get_peft_model(module, config)
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_" in name:
                    noise = torch.randn(p.shape, generator=gen)
                    p.mul_(1 + 0.1 * noise) if "magnitude" in name else p.copy_(0.1 * noise)
        for key, value in get_peft_model_state_dict(wrapped).items():
            tensors[f"{_PEFT_PREFIX[comp]}.{key.removeprefix('base_model.model.')}"] = \
                value.detach().clone().contiguous()
        for name in names:
            layers[(comp, name)] = wrapped.base_model.model.get_submodule(name)
        meta |= {f"{_PEFT_PREFIX[comp]}.r": 4, f"{_PEFT_PREFIX[comp]}.lora_alpha": 3}
    return tensors, {"lora_adapter_metadata": json.dumps(meta)}, layers


def peft_reference(layer, weight: torch.Tensor) -> torch.Tensor:
    """PEFT's own merged DoRA weight when the base layer holds ``weight``."""
    base = layer.base_layer
    keep = base.weight.detach().clone()
    with torch.no_grad():
        base.weight.copy_(weight)
        layer.merge(adapter_names=["default"])
        out = base.weight.detach().float().clone()
        layer.merged_adapters.clear()
        base.weight.copy_(keep)
    return out


def _family(request, fam_name):
    fam = request.getfixturevalue(fam_name)
    return fam, fam_name.removeprefix("tiny_")


def _weights(pipe, keys):
    return {(c, p): getattr(pipe, c).get_submodule(p).weight.detach().float().clone()
            for c, p in keys}


def _check(got_pipe, before, refs, strength, how, reference):
    worst = 0.0
    for key, w in before.items():
        want = w + strength * (reference(refs[key], w) - w)
        got = getattr(got_pipe, key[0]).get_submodule(key[1]).weight.detach().float()
        err = float((got - want).norm() / want.norm())
        worst = max(worst, err)
        assert err <= 1e-5, f"{how} {key}: relative error {err:.2e}"
    assert len(before) > 50
    return worst


def _apply_both_ways(fam, path, tmp_path, strength):
    live = load_pipeline(fam.base, config_folder=fam.config_folder)
    lora = read_lora(path)
    changed = apply_to_pipeline(live, [(lora, strength)])
    out = tmp_path / "applied.safetensors"
    args = build_parser("lora").parse_args(["lora", "apply", str(fam.base), f"{path}:{strength}",
                                             "-o", str(out), "--dtype", "fp32"])
    assert args.func(args) in (0, None)  # the CLI command (it writes through apply_to_file)
    return lora, changed, live, load_pipeline(out, config_folder=fam.config_folder)


@pytest.mark.parametrize("fam_name", ["tiny_sd1", "tiny_sdxl"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lycoris_weighted_apply_equals_reference(request, tmp_path, fam_name, case):
    fam, arch = _family(request, fam_name)
    src = load_pipeline(fam.base, config_folder=fam.config_folder)
    tensors, modules = build_lycoris(src, arch, CASES[case])
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(path))
    lora, changed, live, from_file = _apply_both_ways(fam, path, tmp_path, 0.7)
    assert lora.arch.name == arch and changed >= len(modules)
    before = _weights(src, modules)
    for pipe, how in ((live, "pipeline"), (from_file, "file")):
        _check(pipe, before, modules, 0.7, how, lycoris_reference)


@pytest.mark.parametrize("fam_name", ["tiny_sd2", "tiny_flux1", "tiny_sd35_medium"])
def test_weighted_kinds_on_other_architectures(request, tmp_path, fam_name):
    """SD2 (OpenCLIP text encoder: q/k/v in one in_proj) and the DiTs (fused qkv, Flux's
    linear1 parts): each module's rule meets its own rows of the fused tensor."""
    fam, arch = _family(request, fam_name)
    src = load_pipeline(fam.base, config_folder=fam.config_folder)
    tensors, modules = build_lycoris(src, arch, CASES["mixed"])
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    lora, _, live, from_file = _apply_both_ways(fam, path, tmp_path, 0.7)
    assert len(lora.modules) == len(modules) and len(lora.kinds()) == 5
    before = _weights(src, modules)
    for pipe, how in ((live, "pipeline"), (from_file, "file")):
        _check(pipe, before, modules, 0.7, how, lycoris_reference)


@pytest.mark.parametrize("fam_name", ["tiny_sd1", "tiny_sdxl"])
def test_peft_dora_apply_equals_peft_merge(request, tmp_path, fam_name):
    fam, arch = _family(request, fam_name)
    base = load_pipeline(fam.base, config_folder=fam.config_folder)
    before = _weights(base, [(c, p) for c, p, _ in _targets(base, arch)])
    src = load_pipeline(fam.base, config_folder=fam.config_folder)
    tensors, metadata, layers = build_peft_dora(src, arch)
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    path = tmp_path / "peft_dora.safetensors"
    save_file(tensors, str(path), metadata)
    lora, _, live, from_file = _apply_both_ways(fam, path, tmp_path, 1.0)
    assert lora.kinds() == {"DoRA": len(layers)}
    for pipe, how in ((live, "pipeline"), (from_file, "file")):
        _check(pipe, before, layers, 1.0, how, peft_reference)


@pytest.fixture(params=["sd1", "sdxl"])
def merge_case(request, tmp_path):
    """A weighted-sum merge, a plain LoRA, then a LoRA mixing every LyCORIS weighted kind."""
    fam = request.getfixturevalue(f"tiny_{request.param}")
    src = load_pipeline(fam.a, config_folder=fam.config_folder)
    tensors, modules = build_lycoris(src, fam.arch, CASES["mixed"], seed=3)
    mixed = tmp_path / "mixed.safetensors"
    save_file(tensors, str(mixed))
    te = "te1" if fam.arch == "sdxl" else "te"
    plain = random_lora(open_checkpoint(fam.a), rank=4, seed=1, components=("unet", te),
                        every=2, scale=0.2)
    plain_path = save_lora(plain, tmp_path / "plain.safetensors", dtype=torch.float32)
    return fam, modules, plain_path, mixed


def _expected_on_merge(fam, modules, plain_path, tmp_path, recipe, s_plain, s_mixed):
    """W_m + s1·Δ1, then the mixed LoRA's rule on that weight (ComfyUI's chain order)."""
    merge_to_file(recipe.replace(loras=(LoraSpec(str(plain_path), s_plain),)),
                  tmp_path / "first.safetensors", dtype="fp32")
    first = load_pipeline(tmp_path / "first.safetensors", config_folder=fam.config_folder)
    return first, _weights(first, modules)


def test_engine_and_merge_apply_weighted_lora_on_the_merged_weight(merge_case, tmp_path):
    fam, modules, plain_path, mixed = merge_case
    specs = (LoraSpec(str(plain_path), 0.6), LoraSpec(str(mixed), 0.8, te_strength=0.5))
    recipe = Recipe(arch=fam.arch, method="weighted_sum", vocabulary="mbw",
                    ratios={**uniform_ratios(fam.arch, "mbw", 0.35), "BASE": 0.6},
                    models={"model1": Source(str(fam.a)), "model2": Source(str(fam.b))},
                    loras=specs)
    _, before = _expected_on_merge(fam, modules, plain_path, tmp_path, recipe, 0.6, 0.8)
    engine = MergeEngine(load_pipeline(fam.a, config_folder=fam.config_folder), recipe)
    engine.apply(recipe.replace(loras=(specs[0], LoraSpec(str(mixed), 0.1))))
    engine.apply(recipe)  # the strength changed: the weighted step runs again on the merge
    merge_to_file(recipe, tmp_path / "m.safetensors", dtype="fp32")
    merged = load_pipeline(tmp_path / "m.safetensors", config_folder=fam.config_folder)
    unet = {k: v for k, v in before.items() if k[0] == "unet"}
    te = {k: v for k, v in before.items() if k[0] != "unet"}
    for pipe, how in ((engine.pipe, "engine"), (merged, "merge file")):
        _check(pipe, unet, modules, 0.8, how, lycoris_reference)
        for key, w in te.items():  # text encoders take te_strength
            want = w + 0.5 * (lycoris_reference(modules[key], w) - w)
            got = getattr(pipe, key[0]).get_submodule(key[1]).weight.detach().float()
            assert float((got - want).norm() / want.norm()) <= 1e-5, (how, key)


def test_weighted_module_cannot_be_subtracted_or_added(tmp_path, tiny_sd1):
    src = load_pipeline(tiny_sd1.base, config_folder=tiny_sd1.config_folder)
    tensors, _ = build_lycoris(src, "sd1", ("ia3_out",))
    path = tmp_path / "ia3.safetensors"
    save_file(tensors, str(path))
    lora = read_lora(path)
    with pytest.raises(LoraError, match="IA3 modules change a weight by a rule"):
        apply_to_pipeline(src, [(lora, 1.0)], sign=-1.0)
    with pytest.raises(LoraError, match="is IA3: its change depends on the weight"):
        next(iter(lora.modules.values())).delta()
    assert load_file(path).keys() == tensors.keys()


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_study_with_searched_strength_applies_weighted_lora(request, arch, tmp_path):
    """A study searching the strength of a LoRA mixing every LyCORIS weighted kind: the
    scored candidate (the engine's live weights) equals the reference on that trial's merge."""
    from test_study import run, study_config

    from evaluators.testing import write_tiny_open_clip
    from search import run_folder as rf

    fam = request.getfixturevalue(f"tiny_{arch}")
    src = load_pipeline(fam.a, config_folder=fam.config_folder)
    tensors, modules = build_lycoris(src, arch, CASES["mixed"], seed=5)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    clip = write_tiny_open_clip(tmp_path / "clip", name=f"weighted-clip-{arch}", seed=0)
    cfg = study_config(fam, clip, tmp_path, trials=2, merge={
        "loras": [{"path": str(path), "strength": {"low": 0.2, "high": 0.9}}]})
    study, ctx = run(cfg)
    last = max(rf.completed(study), key=lambda t: t.number)
    recipe = rf.trial_recipe(last)
    strength = recipe.loras[0].strength
    assert strength == pytest.approx(last.params["lora0"]) and 0.2 <= strength <= 0.9
    merge_to_file(recipe.replace(loras=()), tmp_path / "plain.safetensors", dtype="fp32")
    before = _weights(load_pipeline(tmp_path / "plain.safetensors",
                                    config_folder=fam.config_folder), modules)
    _check(ctx.engine.pipe, before, modules, strength, "study", lycoris_reference)


@pytest.mark.gpu
@pytest.mark.parametrize("memory", ["auto", "offload"])
def test_engine_on_cuda_applies_weighted_lora_as_the_cpu_file_merge(merge_case, tmp_path, memory):
    fam, modules, plain_path, mixed = merge_case
    specs = (LoraSpec(str(plain_path), 0.6), LoraSpec(str(mixed), 0.8))
    recipe = Recipe(arch=fam.arch, method="weighted_sum", vocabulary="mbw",
                    ratios=uniform_ratios(fam.arch, "mbw", 0.35),
                    models={"model1": Source(str(fam.a)), "model2": Source(str(fam.b))},
                    loras=specs)
    pipe = load_pipeline(fam.a, config_folder=fam.config_folder, device="cuda")
    engine = MergeEngine(pipe, recipe, device="cuda", memory=memory)
    engine.apply(recipe)
    merge_to_file(recipe, tmp_path / "m.safetensors", dtype="fp32")
    merged = load_pipeline(tmp_path / "m.safetensors", config_folder=fam.config_folder)
    for comp, path in modules:
        want = getattr(merged, comp).get_submodule(path).weight.detach().float()
        got = getattr(pipe, comp).get_submodule(path).weight.detach().float().cpu()
        assert float((got - want).norm() / want.norm()) <= 1e-5, (comp, path)
