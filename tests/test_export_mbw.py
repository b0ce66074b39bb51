"""SuperMerger block-weight strings: the values SuperMerger reads, round trips and lossy cases."""

from __future__ import annotations

import pytest

from merge_backend import ARCHITECTURES, ClipMerge, Recipe, Source, block_of
from merge_backend.export import MbwError, mbw_ratios, mbw_string, mbw_to_comfy, parse_mbw
from merge_backend.recipe import uniform_ratios

MODELS = {"model1": Source("a.safetensors"), "model2": Source("b.safetensors")}


def _recipe(arch: str, vocabulary: str, ratios: dict, **kw) -> Recipe:
    models = dict(MODELS)
    if kw.get("method") == "add_difference":
        models["base"] = Source("c.safetensors")
    return Recipe(arch=arch, method=kw.pop("method", "weighted_sum"), models=models,
                  vocabulary=vocabulary, ratios=ratios, **kw)


def _mbw_ratios(arch: str) -> dict[str, float]:
    names = uniform_ratios(arch, "mbw", 0)
    return {n: round((i * 0.137) % 1.0, 3) for i, n in enumerate(names)}


@pytest.mark.parametrize("arch,count", [("sd1", 26), ("sd2", 26), ("sdxl", 20)])
def test_string_round_trips(arch, count):
    recipe = _recipe(arch, "mbw", _mbw_ratios(arch))
    text = mbw_string(recipe)
    alphas = [float(v) for v in text.split(",")]
    assert len(alphas) == count
    # SuperMerger's alpha is model B's share: alpha = 1 - ratio, BASE first.
    assert alphas[0] == pytest.approx(1 - recipe.ratios["BASE"], abs=1e-12)
    assert alphas[5] == pytest.approx(1 - recipe.ratios["IN04"], abs=1e-12)
    assert parse_mbw(text, arch) == recipe.ratios
    again = recipe.replace(ratios=parse_mbw(text, arch))
    assert mbw_string(again) == text


def test_full_precision_ratios_round_trip_to_six_decimals():
    ratios = {n: 0.123456789 for n in uniform_ratios("sdxl", "mbw", 0)}
    back = parse_mbw(mbw_string(_recipe("sdxl", "mbw", ratios)), "sdxl")
    assert all(abs(back[n] - 0.123456789) <= 5e-7 for n in ratios)


def test_other_vocabularies_convert_exactly():
    blocks = _recipe("sd1", "blocks", {"input": 0.2, "middle": 0.5, "out": 0.9},
                     clip=ClipMerge("weighted_sum", 0.25))
    ratios, notes = mbw_ratios(blocks)
    assert not notes
    assert ratios["BASE"] == 0.25 and ratios["M00"] == 0.5
    assert all(ratios[f"IN{i:02d}"] == 0.2 and ratios[f"OUT{i:02d}"] == 0.9 for i in range(12))
    assert mbw_string(blocks).split(",")[:2] == ["0.75", "0.8"]
    single = _recipe("sdxl", "single", {"all": 0.4})
    assert mbw_string(single) == ",".join(["0"] + ["0.6"] * 19)  # BASE 0: model1's encoders


def test_comfy_sliders_that_share_a_weight_must_agree():
    comfy = uniform_ratios("sd1", "comfy", 0.5)
    same = _recipe("sd1", "comfy", {**comfy, "input_blocks.3.": 0.1})
    assert mbw_ratios(same)[0]["IN03"] == 0.1
    for slider, block in (("time_embed.", "IN00"), ("middle_block.2.", "M00"), ("out.", "OUT11")):
        lossy = _recipe("sd1", "comfy", {**comfy, slider: 0.2})
        with pytest.raises(MbwError, match=f"{block}.*{slider}=0.2"):
            mbw_string(lossy)
        ratios, notes = mbw_ratios(lossy, lossy=True)
        assert len(notes) == 1 and block in notes[0]
    # SD1 has no label_emb keys, so its slider does not matter there; SDXL's does.
    assert mbw_ratios(_recipe("sd1", "comfy", {**comfy, "label_emb.": 0.0}))[1] == []
    xl = uniform_ratios("sdxl", "comfy", 0.5)
    with pytest.raises(MbwError, match="label_emb"):
        mbw_string(_recipe("sdxl", "comfy", {**xl, "label_emb.": 0.0}))


def test_add_difference_alpha_is_the_scaled_difference():
    ratios = {n: 0.25 for n in uniform_ratios("sd1", "mbw", 0)}
    ratios["BASE"] = 1.0
    recipe = _recipe("sd1", "mbw", ratios, method="add_difference", multiplier=0.8)
    text = mbw_string(recipe)
    assert text.split(",")[:2] == ["0", "0.6"]  # A + (1 - 0.25) * 0.8 * (B - C)
    assert parse_mbw(text, "sd1", method="add_difference", multiplier=0.8) == ratios
    with pytest.raises(MbwError, match="BASE"):
        mbw_string(recipe.replace(ratios={**ratios, "BASE": 0.5}))


def test_what_has_no_supermerger_form_is_refused():
    with pytest.raises(MbwError, match="subtract"):
        mbw_string(_recipe("sd1", "single", {}, method="subtract"))
    with pytest.raises(MbwError, match="CLIPMergeAdd|add"):
        mbw_string(_recipe("sd1", "single", {"all": 0.5}, clip=ClipMerge("add")))
    with pytest.raises(MbwError, match="has 3 values; sd1 needs 26"):
        parse_mbw("0,0.5,1", "sd1")
    with pytest.raises(MbwError, match="IN01 is 'x'"):
        parse_mbw(",".join(["0", "0", "x"] + ["0"] * 23), "sd1")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_mbw_to_comfy_gives_every_key_the_same_ratio(arch, tiny_sd1, tiny_sdxl):
    from merge_backend import open_checkpoint

    fam = {"sd1": tiny_sd1, "sdxl": tiny_sdxl}[arch]
    a = ARCHITECTURES[arch]
    ratios = _mbw_ratios(arch)
    sliders = mbw_to_comfy(a, ratios)
    keys = [k for k in open_checkpoint(fam.a).keys() if k.startswith("model.diffusion_model.")]
    for key in keys:
        assert sliders[block_of(a, "comfy", key)] == ratios[block_of(a, "mbw", key)], key
