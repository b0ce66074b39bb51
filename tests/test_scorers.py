"""Scorers on tiny models stored in their real file formats; score cards and combination maths.

Batched scoring is compared with one-by-one scoring within 1e-5 (absolute, on raw values): not
bit-exact, because CPU matmul kernels block differently for different batch sizes.
Preprocessing itself is exact per image; tests/test_scorer_preprocessing.py checks it against
the reference implementations at probe sizes.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPImageProcessor  # noqa: E402

from evaluators import (  # noqa: E402
    ClipScoreConfig,
    ProbeSet,
    ScoreCard,
    ScoreNorm,
    Scorer,
    ScorerError,
    build_scorer,
    combine,
    evaluate,
    objective_vector,
    score_images,
    score_norms,
    scorer_config,
)
from evaluators._aesthetic_head import AestheticHead  # noqa: E402
from evaluators.testing import TinyScorerFiles, write_tiny_scorer_files  # noqa: E402
from merge_backend.pipeline import empty_pipeline  # noqa: E402

# diffusers' schedulers call np.array on tensors; numpy 2 warns on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
PROMPTS = ["a cat", "a red car", "a cat", "a mountain lake at dawn", "a bowl of fruit"]
MODEL_SCORERS = ("clip", "laion_aesthetic", "hpsv2", "pickscore", "reference")


def _images(n: int, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    # Quantised to 8 bits so PNG round trips and PIL-based processors see the same pixels.
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, h, w, generator=g) * 255).round() / 255


IMAGES = _images(5)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TinyScorerFiles:
    return write_tiny_scorer_files(tmp_path_factory.mktemp("scorer_models"))


def _config_dicts(files: TinyScorerFiles) -> dict[str, dict]:
    clip = {"model": str(files.clip_config), "weights": str(files.clip_weights)}
    return {
        "clip": {"kind": "clip", **clip},
        "laion_aesthetic": {"kind": "laion_aesthetic", "model": str(files.aesthetic_clip_config),
                            "weights": str(files.aesthetic_clip_weights),
                            "head": str(files.aesthetic_head)},
        "hpsv2": {"kind": "hpsv2", "model": str(files.hps_config),
                  "weights": str(files.hps_checkpoint)},
        "pickscore": {"kind": "pickscore", "model_dir": str(files.pickscore_dir)},
        "reference": {"kind": "reference", **clip, "mode": "mean"},
        "sanity": {"kind": "sanity"},
    }


@pytest.fixture(scope="module")
def configs(files):
    return {name: scorer_config(data) for name, data in _config_dicts(files).items()}


@pytest.fixture(scope="module")
def scorers(configs):
    built = {name: build_scorer(config, device="cpu") for name, config in configs.items()}
    built["reference"].set_references(_images(3, seed=7))
    return built


# --------------------------------------------------------------------------- file formats


def _assert_same_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    assert set(state) <= set(own)
    for key, value in state.items():
        assert torch.equal(own[key], value.to(own[key].dtype)), key


def test_clip_and_reference_load_open_clip_safetensors(files, scorers):
    state = load_file(str(files.clip_weights))
    _assert_same_state(scorers["clip"].backbone.model, state)
    _assert_same_state(scorers["reference"].backbone.model, state)


def test_aesthetic_loads_the_head_pth_with_the_real_key_names(files, scorers):
    head = torch.load(files.aesthetic_head, map_location="cpu", weights_only=True)
    keys = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    assert sorted(head) == sorted(keys)
    assert [head[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)] == [1024, 128, 64, 16, 1]
    assert head["layers.0.weight"].shape[1] == 32  # follows the tiny CLIP's embedding width
    _assert_same_state(scorers["laion_aesthetic"].head, head)
    _assert_same_state(scorers["laion_aesthetic"].backbone.model,
                       load_file(str(files.aesthetic_clip_weights)))
    assert json.loads(files.aesthetic_clip_config.read_text())["quick_gelu"] is True


def test_hps_loads_a_state_dict_wrapped_pt(files, scorers):
    checkpoint = torch.load(files.hps_checkpoint, map_location="cpu", weights_only=True)
    assert list(checkpoint) == ["state_dict"]
    _assert_same_state(scorers["hpsv2"].backbone.model, checkpoint["state_dict"])


def test_pickscore_loads_a_transformers_folder_with_an_offline_clip_tokenizer(files, scorers):
    folder = files.pickscore_dir
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    _assert_same_state(scorers["pickscore"].model, load_file(str(folder / "model.safetensors")))
    ids = scorers["pickscore"].tokenizer("a photo of a cat, highly detailed!").input_ids
    reference = open_clip.tokenizer.SimpleTokenizer()("a photo of a cat, highly detailed!")[0]
    assert ids == reference[: len(ids)].tolist()


def test_every_built_scorer_meets_the_protocol(scorers):
    for name, scorer in scorers.items():
        assert isinstance(scorer, Scorer)
        values = scorer.score(IMAGES, PROMPTS)
        assert values.shape == (5,) and values.dtype == torch.float32, name
        assert torch.isfinite(values).all(), name


# --------------------------------------------------------------------------- definitions


def _open_clip_raw(backbone, images, prompts):
    with torch.no_grad():
        image = backbone.model.encode_image(backbone.preprocess(images))
        text = backbone.model.encode_text(backbone.tokenizer(prompts))
    return image, text


def test_clip_score_is_100_cos_and_hps_is_the_normalised_dot(scorers):
    image, text = _open_clip_raw(scorers["clip"].backbone, IMAGES, PROMPTS)
    expected = 100 * F.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(scorers["clip"].score(IMAGES, PROMPTS), expected, rtol=0, atol=1e-4)
    image, text = _open_clip_raw(scorers["hpsv2"].backbone, IMAGES, PROMPTS)
    expected = (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)
    torch.testing.assert_close(scorers["hpsv2"].score(IMAGES, PROMPTS), expected, rtol=0, atol=1e-6)


def test_aesthetic_is_the_affine_head_on_normalised_embeddings(scorers):
    scorer = scorers["laion_aesthetic"]
    image, _ = _open_clip_raw(scorer.backbone, IMAGES, PROMPTS)
    x = image / image.norm(dim=-1, keepdim=True)
    state = scorer.head.state_dict()
    for i in (0, 2, 4, 6, 7):  # no activations: five affine maps
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(scorer.score(IMAGES, PROMPTS), x[:, 0], rtol=0, atol=1e-5)


def test_pickscore_is_logit_scale_times_cos_with_clip_processor_pixels(files, scorers):
    scorer = scorers["pickscore"]
    pils = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            for im in IMAGES]
    processor = CLIPImageProcessor.from_pretrained(files.pickscore_dir)
    pixels = processor(images=pils, return_tensors="pt")
    assert torch.equal(scorer.preprocess(IMAGES), pixels["pixel_values"])  # see test_scorer_preprocessing
    with torch.no_grad():
        image = scorer.model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
        tokens = scorer.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        text = scorer.model.get_text_features(**tokens).pooler_output
        expected = scorer.model.logit_scale.exp() * F.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(scorer.score(IMAGES, PROMPTS), expected, rtol=0, atol=1e-4)


def test_embeddings_are_l2_normalised(scorers):
    odd_sizes = _images(2, 48, 80, seed=3)
    for name in MODEL_SCORERS:
        for images in (IMAGES, odd_sizes):
            norms = scorers[name].image_embeddings(images).norm(dim=-1)
            torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    for name in ("clip", "hpsv2", "pickscore"):
        norms = scorers[name].text_embeddings(PROMPTS).norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    ref_norms = scorers["reference"].reference_embeddings.norm(dim=-1)
    torch.testing.assert_close(ref_norms, torch.ones_like(ref_norms), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- determinism, batching


def test_scores_are_bit_identical_twice_and_after_a_rebuild(configs, scorers):
    for name, scorer in scorers.items():
        assert torch.equal(scorer.score(IMAGES, PROMPTS), scorer.score(IMAGES, PROMPTS)), name
    rebuilt = build_scorer(configs["clip"], device="cpu")
    assert torch.equal(rebuilt.score(IMAGES, PROMPTS), scorers["clip"].score(IMAGES, PROMPTS))


@pytest.mark.parametrize("name", [*MODEL_SCORERS, "sanity"])
def test_batched_scoring_equals_one_by_one_within_1e_5(scorers, name):
    scorer = scorers[name]
    batched = scorer.score(IMAGES, PROMPTS)
    single = torch.cat([scorer.score(IMAGES[i : i + 1], PROMPTS[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_batch_size_setting_changes_nothing_beyond_1e_5(files):
    data = {**_config_dicts(files)["clip"], "batch_size": 2}
    small = build_scorer(data, device="cpu")
    large = build_scorer({**data, "batch_size": 16}, device="cpu")
    torch.testing.assert_close(small.score(IMAGES, PROMPTS), large.score(IMAGES, PROMPTS),
                               rtol=0, atol=1e-5)


def test_dtype_is_an_argument(configs):
    scorer = build_scorer(configs["clip"], device="cpu", dtype=torch.bfloat16)
    assert next(scorer.backbone.model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(scorer.score(IMAGES, PROMPTS)).all()


# --------------------------------------------------------------------------- bad files


def _bad_configs(files: TinyScorerFiles, tmp: Path) -> dict[str, tuple[dict, Path | str, str]]:
    good = _config_dicts(files)
    (tmp / "garbage.safetensors").write_bytes(b"this is not a model")
    (tmp / "not_clip.json").write_text('{"hidden_size": 32}')
    torch.save({"w": torch.zeros(2)}, tmp / "wrong_keys.pth")
    torch.manual_seed(0)
    torch.save(AestheticHead(768).state_dict(), tmp / "vit_l_head.pth")
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, tmp / "wrong_hps.pt")
    (tmp / "no_weights").mkdir(exist_ok=True)
    (tmp / "no_weights" / "config.json").write_text("{}")
    (tmp / "empty_refs").mkdir(exist_ok=True)
    missing = tmp / "missing.safetensors"
    aesthetic = good["laion_aesthetic"]
    return {
        "clip weights missing": ({**good["clip"], "weights": str(missing)}, missing,
                                 "does not exist"),
        "clip weights garbage": ({**good["clip"], "weights": str(tmp / "garbage.safetensors")},
                                 tmp / "garbage.safetensors", "is not safetensors or torch"),
        "clip weights of another model": ({**good["clip"], "weights": str(files.aesthetic_head)},
                                          files.aesthetic_head, "failed to load"),
        "clip config missing": ({**good["clip"], "model": str(tmp / "nope.json")},
                                tmp / "nope.json", "does not exist"),
        "clip config not open_clip": ({**good["clip"], "model": str(tmp / "not_clip.json")},
                                      tmp / "not_clip.json", "missing embed_dim"),
        "clip unknown model name": ({**good["clip"], "model": "ViT-Q-99"}, "ViT-Q-99",
                                    "open_clip has no model named"),
        "aesthetic head missing": ({**good["laion_aesthetic"], "head": str(tmp / "h.pth")},
                                   tmp / "h.pth", "does not exist"),
        "aesthetic head wrong keys": ({**aesthetic, "head": str(tmp / "wrong_keys.pth")},
                                      tmp / "wrong_keys.pth", "not a LAION aesthetic head"),
        "aesthetic head wrong width": ({**aesthetic, "head": str(tmp / "vit_l_head.pth")},
                                       tmp / "vit_l_head.pth", "takes 768-wide embeddings"),
        "hps checkpoint missing": ({**good["hpsv2"], "weights": str(tmp / "hps.pt")},
                                   tmp / "hps.pt", "does not exist"),
        "hps checkpoint wrong": ({**good["hpsv2"], "weights": str(tmp / "wrong_hps.pt")},
                                 tmp / "wrong_hps.pt", "failed to load"),
        "pickscore folder missing": ({**good["pickscore"], "model_dir": str(tmp / "ps")},
                                     tmp / "ps", "does not exist"),
        "pickscore without weights": ({**good["pickscore"], "model_dir": str(tmp / "no_weights")},
                                      tmp / "no_weights", "holds none of model.safetensors"),
        "reference folder empty": ({**good["reference"], "references": str(tmp / "empty_refs")},
                                   tmp / "empty_refs", "holds no"),
    }


def test_missing_or_wrong_files_fail_at_build_naming_scorer_and_path(files, tmp_path):
    for case, (data, path, reason) in _bad_configs(files, tmp_path).items():
        data = {**data, "name": f"my_{data['kind']}"}
        with pytest.raises(ScorerError) as caught:
            build_scorer(data, device="cpu")
        message = str(caught.value)
        assert f"'my_{data['kind']}'" in message, case
        assert str(path) in message, (case, message)
        assert reason in message, (case, message)


def test_typed_configs_check_files_when_made(tmp_path):
    expected = r"scorer 'clip' \(clip\): weights file .*nope.pt does not exist"
    with pytest.raises(ValueError, match=expected):
        ClipScoreConfig(model="ViT-B-32", weights=tmp_path / "nope.pt")


def test_unknown_kinds_and_fields_are_rejected(files):
    with pytest.raises(ScorerError, match="unknown scorer kind 'imagereward'.*clip"):
        scorer_config({"kind": "imagereward"})
    with pytest.raises(ScorerError, match="Extra inputs are not permitted"):
        scorer_config({**_config_dicts(files)["clip"], "wieght": 2})


# --------------------------------------------------------------------------- sanity, reference


def test_sanity_flags_nan_black_flat_and_clipped_images(scorers):
    fine = _images(1, seed=11)[0]
    nan = fine.clone()
    nan[0, 3, 3] = float("nan")
    saturated = torch.zeros(3, 64, 64)
    saturated[0, :, :40] = 1.0
    saturated[1, :, 40:] = 1.0
    saturated += torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2)) * 0.002
    images = torch.stack([fine, nan, torch.zeros(3, 64, 64), torch.full((3, 64, 64), 0.5),
                          torch.ones(3, 64, 64), saturated])
    sanity = scorers["sanity"]
    assert sanity.explain(images) == ["", "nonfinite", "black,flat,clipped", "flat",
                                      "flat,clipped", "clipped"]
    assert sanity.score(images, ["p"] * 6).tolist() == [0.0, -4.0, -3.0, -1.0, -2.0, -1.0]
    failed = sanity.check(images)
    assert failed["black"].tolist() == [False, False, True, False, False, False]


def test_reference_paired_and_mean_modes(files, scorers):
    paired = build_scorer({**_config_dicts(files)["reference"], "mode": "paired"}, device="cpu")
    paired.set_references(IMAGES)
    torch.testing.assert_close(paired.score(IMAGES, PROMPTS), torch.ones(5), rtol=0, atol=1e-5)
    other = _images(5, seed=9)
    expected = (paired.image_embeddings(other) * paired.image_embeddings(IMAGES)).sum(-1)
    torch.testing.assert_close(paired.score(other, PROMPTS), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="5 images but 2 references"):
        paired.set_references(IMAGES[:2])
        paired.score(IMAGES, PROMPTS)
    mean = scorers["reference"]
    cosines = mean.image_embeddings(IMAGES) @ mean.reference_embeddings.T
    torch.testing.assert_close(mean.score(IMAGES, PROMPTS), cosines.mean(-1), rtol=0, atol=1e-6)


def test_reference_folder_equals_in_memory_references(files, tmp_path):
    for i, image in enumerate(_images(3, 48, 80, seed=7)):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(tmp_path / f"ref_{i:02d}.png")
    data = {**_config_dicts(files)["reference"], "references": str(tmp_path)}
    from_folder = build_scorer(data, device="cpu")
    in_memory = build_scorer({**data, "references": None}, device="cpu")
    in_memory.set_references(list(_images(3, 48, 80, seed=7)))
    assert torch.equal(from_folder.reference_embeddings, in_memory.reference_embeddings)
    with pytest.raises(ValueError, match="no references"):
        build_scorer({**data, "references": None}, device="cpu").score(IMAGES, PROMPTS)


# --------------------------------------------------------------------------- combination


def _card(clip: list[float]) -> ScoreCard:
    return ScoreCard(
        raw={"clip": torch.tensor(clip), "aesthetic": torch.tensor([5.5, 4.0, 7.0]),
             "sanity": torch.tensor([0.0, -3.0, 0.0]), "held_out": torch.tensor([9.0, 9.0, 9.0])},
        prompt_weights=torch.tensor([2.0, 1.0, 1.0]), prompts=["a", "b", "c"], seeds=[0, 0, 0])


NORMS = {"clip": ScoreNorm(weight=2.0, low=15.0, high=35.0),
         "aesthetic": ScoreNorm(weight=1.0, low=4.0, high=7.0),
         "sanity": ScoreNorm(weight=0.5, penalty=True)}


def test_combine_on_hand_computed_numbers():
    card = _card([30.0, 20.0, 25.0])
    # clip → [.75, .25, .5], prompt-weighted (2,1,1): 2.25/4 = .5625
    # aesthetic → [.5, 0, 1]: 2/4 = .5;  sanity: -3/4 = -.75, times weight .5 = -.375
    assert card.means()["clip"] == pytest.approx((2 * 30 + 20 + 25) / 4)
    assert combine(card, NORMS) == pytest.approx((2 * 0.5625 + 1 * 0.5) / 3 - 0.375, abs=1e-12)
    assert objective_vector(card, NORMS) == pytest.approx([0.5625 - 0.375, 0.5 - 0.375], abs=1e-12)


def test_combine_counts_non_finite_values_as_the_bottom_of_the_range():
    card = _card([float("nan"), 20.0, 25.0])
    # clip → [0, .25, .5]: .75/4 = .1875
    assert combine(card, NORMS) == pytest.approx((2 * 0.1875 + 0.5) / 3 - 0.375, abs=1e-12)


def test_combine_needs_every_named_scorer_and_ignores_extra_ones():
    card = _card([30.0, 20.0, 25.0])
    with pytest.raises(KeyError, match="pickscore"):
        combine(card, {**NORMS, "pickscore": ScoreNorm()})
    assert "held_out" in card.raw and combine(card, NORMS) == pytest.approx(1.625 / 3 - 0.375)


def test_score_norms_come_from_configs(configs):
    norms = score_norms(list(configs.values()))
    assert norms["clip"] == ScoreNorm(1.0, 15.0, 35.0)
    assert norms["laion_aesthetic"] == ScoreNorm(1.0, 4.0, 7.0)
    assert norms["sanity"].penalty and not norms["pickscore"].penalty
    custom = scorer_config({"kind": "sanity", "name": "guard", "weight": 3.0})
    assert score_norms([custom]) == {"guard": ScoreNorm(3.0, 0.0, 1.0, penalty=True)}


def test_pipeline_to_score_card_is_bit_identical_twice(configs, scorers):
    pipe = empty_pipeline("sd1", "tiny", seed=1)
    probes = ProbeSet(prompts=["a cat", {"text": "a dog", "weight": 3.0}], seeds=[0, 1],
                      steps=2, width=64, height=64, batch_size=4)
    order = list(scorers.values())
    images_a, card_a = evaluate(pipe, probes, order)
    images_b, card_b = evaluate(pipe, probes, order)
    assert torch.equal(images_a.images, images_b.images)
    for name in card_a.raw:
        assert torch.equal(card_a.raw[name], card_b.raw[name]), name
    norms = score_norms(list(configs.values()))
    assert combine(card_a, norms) == combine(card_b, norms)
    assert card_a.prompt_weights.tolist() == [1.0, 1.0, 3.0, 3.0]
    assert card_a.notes["sanity"] == card_b.notes["sanity"]
    json.dumps(card_a.to_dict())
    with pytest.raises(ValueError, match="unique"):
        score_images(images_a, [scorers["clip"], scorers["clip"]])
