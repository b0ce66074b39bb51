"""Scorers see what their reference implementations see, at the sizes probes are drawn.

"Equal" here: the reference gets the 8-bit PIL image a pipeline saves for a probe (diffusers'
``numpy_to_pil``: ``round(255 · x)``), and must produce the same model input as ours from the
float tensor, to the bit — max abs diff 0 in normalised units. Both sides then feed the same
pixels to the same model, so scores agree to float round-off of the model's matmuls (1e-5).
References: open_clip's eval transform (what ``create_model_and_transforms`` returns), and
transformers' ``CLIPImageProcessor``.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessor, CLIPModel  # noqa: E402

from evaluators import build_scorer  # noqa: E402
from evaluators._image_ops import ImagePreprocess  # noqa: E402
from evaluators._open_clip import open_clip_preprocess  # noqa: E402
from evaluators._resample import resize_uint8  # noqa: E402
from evaluators.pickscore import _preprocess_from  # noqa: E402
from evaluators.testing import TinyScorerFiles, write_tiny_scorer_files  # noqa: E402

# (height, width): square probes, landscape 768x512, 1024², an odd non-square portrait, and
# the 160x96 image the issue measured.
PROBE_SIZES = [(512, 512), (512, 768), (1024, 1024), (999, 731), (96, 160)]
PROMPTS = ["a cat", "a red car"]


def _probes(h: int, w: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    # Not quantised: the float tensor a pipeline returns; quantising is part of what is tested.
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed + h * w))


def _saved(images: torch.Tensor) -> list[Image.Image]:
    """What diffusers' numpy_to_pil makes of the probes (and what a user feeds a scorer)."""
    arrays = images.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arrays]


# --------------------------------------------------------------------------- resampling


RESIZES = [  # (h, w) -> (h, w): down, up, one axis each way (both pass orders), odd sizes
    ((512, 768), (224, 336)), ((1024, 1024), (64, 64)), ((999, 731), (87, 64)),
    ((96, 160), (224, 373)), ((100, 37), (50, 200)), ((37, 100), (200, 50)),
    ((80, 50), (79, 51)), ((64, 64), (64, 70)),
]


@pytest.mark.parametrize("src,dst", RESIZES)
@pytest.mark.parametrize("filter,pil_filter", [("bicubic", Image.BICUBIC),
                                               ("bilinear", Image.BILINEAR)])
def test_resampling_is_pillow_and_torch_uint8_to_the_bit(src, dst, filter, pil_filter):
    images = (_probes(*src) * 255).round().to(torch.uint8)
    pillow = torch.stack([torch.from_numpy(np.array(Image.fromarray(a).resize(dst[::-1], pil_filter)))
                          for a in images.permute(0, 2, 3, 1).numpy()]).permute(0, 3, 1, 2)
    assert torch.equal(resize_uint8(images, dst, filter, "pil"), pillow.int())
    native = F.interpolate(images, size=dst, mode=filter, antialias=True, align_corners=False)
    assert torch.equal(resize_uint8(images, dst, filter, "torch"), native.int())


def test_a_float_resize_rounded_once_is_not_the_same():
    # Why the fixed-point emulation: the obvious tensor resize is off by several levels.
    images = (_probes(512, 768) * 255).round()
    pillow = resize_uint8(images.to(torch.uint8), (224, 336), "bicubic", "pil")
    floated = F.interpolate(images, size=(224, 336), mode="bicubic", antialias=True,
                            align_corners=False).clamp(0, 255).round()
    assert (floated - pillow).abs().max() >= 2


# --------------------------------------------------------------------------- open_clip


OPEN_CLIP_CFGS = {
    "shortest": {"size": 64},
    "shortest, non-square model": {"size": (64, 48)},
    "longest, grey fill": {"size": 64, "resize_mode": "longest", "fill_color": 128},
    "squash": {"size": 64, "resize_mode": "squash"},
    "bilinear": {"size": 64, "interpolation": "bilinear"},
    "ViT-L size": {"size": 224},
}


@pytest.mark.parametrize("cfg", OPEN_CLIP_CFGS.values(), ids=OPEN_CLIP_CFGS.keys())
@pytest.mark.parametrize("hw", PROBE_SIZES, ids=[f"{h}x{w}" for h, w in PROBE_SIZES])
def test_open_clip_preprocessing_equals_its_transform(cfg, hw):
    pp = PreprocessCfg(**cfg)
    reference = image_transform_v2(pp, is_train=False)
    images = _probes(*hw)
    expected = torch.stack([reference(image) for image in _saved(images)])
    ours = open_clip_preprocess(vars(pp))(images)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() == 0.0


# --------------------------------------------------------------------------- transformers


PROCESSORS = {
    "pickscore-like": {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}},
    "ViT-H size": {},  # CLIPImageProcessor's defaults: shortest edge 224, crop 224
    "crop below the edge, non-square": {"size": {"shortest_edge": 72},
                                        "crop_size": {"height": 64, "width": 48}},
    "bilinear": {"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64},
                 "resample": 2},
    "squash": {"size": {"height": 64, "width": 64}, "do_center_crop": False},
    "no crop": {"size": {"shortest_edge": 64}, "do_center_crop": False},
}


def _processor_folder(tmp_path: Path, settings: dict) -> Path:
    CLIPImageProcessor(**settings).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("settings", PROCESSORS.values(), ids=PROCESSORS.keys())
@pytest.mark.parametrize("hw", PROBE_SIZES, ids=[f"{h}x{w}" for h, w in PROBE_SIZES])
def test_transformers_preprocessing_equals_clip_image_processor(tmp_path, settings, hw):
    folder = _processor_folder(tmp_path, settings)
    images = _probes(*hw)
    processor = CLIPImageProcessor.from_pretrained(folder)
    expected = processor(images=_saved(images), return_tensors="pt")["pixel_values"]
    ours = _preprocess_from(folder / "preprocessor_config.json")(images)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() == 0.0
    # transformers 4's processor (now CLIPImageProcessorPil) resamples with Pillow: torch's
    # 16-bit weights land within one 8-bit level of it when shrinking, two when enlarging
    # (1 level = 1 / 255 / std in normalised units), at under 1% of the values.
    pil_module = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    pil = pil_module.CLIPImageProcessorPil(**settings)(images=_saved(images), return_tensors="pt")
    diff = (ours - pil["pixel_values"]).abs()
    levels = 1 if min(hw) >= (settings.get("size") or {}).get("shortest_edge", 224) else 2
    assert diff.max().item() <= levels / 255 / min(processor.image_std) + 1e-6
    assert (diff > 1e-6).float().mean().item() < 0.01


def test_processor_settings_we_cannot_match_are_refused_naming_the_file(tmp_path):
    folder = _processor_folder(tmp_path, {"resample": 1})  # Lanczos
    with pytest.raises(ValueError, match=r"preprocessor_config.json: resample=1"):
        _preprocess_from(folder / "preprocessor_config.json")


# --------------------------------------------------------------------------- every scorer kind


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> TinyScorerFiles:
    return write_tiny_scorer_files(tmp_path_factory.mktemp("preprocessing_models"))


@pytest.fixture(scope="module")
def scorers(files):
    clip = {"model": str(files.clip_config), "weights": str(files.clip_weights)}
    configs = {
        "clip": {"kind": "clip", **clip},
        "reference": {"kind": "reference", **clip, "mode": "paired"},
        "hpsv2": {"kind": "hpsv2", "model": str(files.hps_config),
                  "weights": str(files.hps_checkpoint)},
        "laion_aesthetic": {"kind": "laion_aesthetic", "model": str(files.aesthetic_clip_config),
                            "weights": str(files.aesthetic_clip_weights),
                            "head": str(files.aesthetic_head)},
        "pickscore": {"kind": "pickscore", "model_dir": str(files.pickscore_dir)},
    }
    return {name: build_scorer(config, device="cpu") for name, config in configs.items()}


@pytest.fixture(scope="module")
def open_clip_users(files):
    """What a user of open_clip builds from each scorer's files: (model, preprocess, tokenizer)."""
    out = {}
    for config, weights in ((files.clip_config, files.clip_weights),
                            (files.hps_config, files.hps_checkpoint),
                            (files.aesthetic_clip_config, files.aesthetic_clip_weights)):
        open_clip.add_model_config(config)
        model, _, preprocess = open_clip.create_model_and_transforms(
            config.stem, pretrained=str(weights), weights_only=True)
        out[config] = (model.eval(), preprocess, open_clip.get_tokenizer(config.stem))
    return out


def _open_clip_reference(user, images: torch.Tensor):
    """(image, prompt) embeddings exactly as a user of open_clip gets them from saved images."""
    model, preprocess, tokenizer = user
    with torch.no_grad():
        pixels = torch.stack([preprocess(image) for image in _saved(images)])
        return model.encode_image(pixels), model.encode_text(tokenizer(PROMPTS))


@pytest.mark.parametrize("hw", PROBE_SIZES, ids=[f"{h}x{w}" for h, w in PROBE_SIZES])
def test_every_scorer_kind_scores_what_its_reference_scores(files, scorers, open_clip_users, hw):
    images = _probes(*hw, seed=1)
    cos = torch.nn.functional.cosine_similarity

    image, text = _open_clip_reference(open_clip_users[files.clip_config], images)
    torch.testing.assert_close(scorers["clip"].score(images, PROMPTS), 100 * cos(image, text),
                               rtol=0, atol=1e-4)

    others = _probes(*hw, seed=2)
    scorers["reference"].set_references(others)
    other_image, _ = _open_clip_reference(open_clip_users[files.clip_config], others)
    torch.testing.assert_close(scorers["reference"].score(images, PROMPTS),
                               cos(image, other_image), rtol=0, atol=1e-5)

    image, text = _open_clip_reference(open_clip_users[files.hps_config], images)
    torch.testing.assert_close(scorers["hpsv2"].score(images, PROMPTS), cos(image, text),
                               rtol=0, atol=1e-5)

    image, _ = _open_clip_reference(open_clip_users[files.aesthetic_clip_config], images)
    head = torch.load(files.aesthetic_head, weights_only=True)
    x = image / image.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # the published head: five affine layers, no activations
        x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]
    torch.testing.assert_close(scorers["laion_aesthetic"].score(images, PROMPTS), x[:, 0],
                               rtol=0, atol=1e-5)

    model = CLIPModel.from_pretrained(files.pickscore_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(files.pickscore_dir)
    with torch.no_grad():
        pixels = processor(images=_saved(images), return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output
        tokens = scorers["pickscore"].tokenizer(PROMPTS, padding=True, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
        expected = model.logit_scale.exp() * cos(image, text)
    torch.testing.assert_close(scorers["pickscore"].score(images, PROMPTS), expected,
                               rtol=0, atol=1e-4)


def test_the_old_float_preprocessing_would_have_failed_these_tests(files):
    # The 160x96 case: a float antialiased resize (no 8-bit image in between) is far
    # from the reference, so the checks above can tell a wrong preprocessing from a right one.
    images = _probes(96, 160)
    open_clip.add_model_config(files.clip_config)
    _, _, preprocess = open_clip.create_model_and_transforms(files.clip_config.stem)
    expected = torch.stack([preprocess(image) for image in _saved(images)])
    resized = F.interpolate(images, size=(64, 106), mode="bicubic", antialias=True,
                            align_corners=False).clamp(0, 1)[..., 21:85]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    assert ((resized - mean) / std - expected).abs().max() > 0.02


# --------------------------------------------------------------------------- batches, NaN, GPU


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("reference", ["open_clip", "transformers"])
def test_batch_preprocessing_is_exactly_per_image(mode, reference):
    if reference == "transformers" and mode == "longest":
        pytest.skip("CLIPImageProcessor has no 'longest' mode")
    preprocess = ImagePreprocess(size=(64, 64), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25),
                                 resize_mode=mode, reference=reference)
    images = _probes(48, 80, n=3, seed=5)
    batch = preprocess(images)
    assert batch.shape == (3, 3, 64, 64)
    assert torch.equal(batch, torch.cat([preprocess(images[i : i + 1]) for i in range(3)]))


def test_an_image_with_nan_scores_nan_and_leaves_the_others_alone(scorers):
    scorer = scorers["clip"]
    images = _probes(96, 160, n=3)
    clean = scorer.score(images, PROMPTS + ["a dog"])
    images[1, 0, 5, 5] = float("nan")
    dirty = scorer.score(images, PROMPTS + ["a dog"])
    assert torch.isnan(dirty[1]) and torch.equal(dirty[[0, 2]], clean[[0, 2]])


@pytest.mark.gpu
@pytest.mark.parametrize("reference", ["open_clip", "transformers"])
def test_preprocessing_on_cuda_equals_cpu(reference):
    preprocess = ImagePreprocess(size=(224, 224), mean=(0.48, 0.46, 0.41),
                                 std=(0.27, 0.26, 0.28), reference=reference)
    for hw in PROBE_SIZES:
        images = _probes(*hw, n=4)
        on_gpu = preprocess(images.cuda().half())  # fp16 probes, as a half pipeline draws them
        assert on_gpu.device.type == "cuda"
        # The 8-bit resize is integer arithmetic; only the float32 normalisation may round
        # differently on CUDA (fused multiply-add: 2.4e-7 seen on an H200). One 8-bit level
        # is 1/255 / std ~ 0.015, so 1e-6 still catches any real preprocessing difference.
        assert (on_gpu.cpu() - preprocess(images.half())).abs().max() <= 1e-6

