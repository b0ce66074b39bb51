"""Every built-in scorer passes the scorer contract (evaluators/scorer_contract.py) on tiny
models stored in their real file formats (evaluators.testing)."""

from __future__ import annotations

import pytest
from PIL import Image

from evaluators.scorer_contract import ScorerContract, random_images
from evaluators.testing import write_tiny_scorer_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_scorer_files(tmp_path_factory.mktemp("scorer_models"))


class BuiltIn(ScorerContract):
    def make(self, files, folder):
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def config_data(cls, files, tmp_path_factory):
        return cls().make(files, tmp_path_factory.mktemp("scorer_config"))


class TestClip(BuiltIn):
    def make(self, files, folder):
        return {"kind": "clip", "model": str(files.clip_config), "weights": str(files.clip_weights)}


class TestHpsV2(BuiltIn):
    def make(self, files, folder):
        return {"kind": "hpsv2", "model": str(files.hps_config), "weights": str(files.hps_checkpoint)}


class TestLaionAesthetic(BuiltIn):
    def make(self, files, folder):
        return {"kind": "laion_aesthetic", "model": str(files.aesthetic_clip_config),
                "weights": str(files.aesthetic_clip_weights), "head": str(files.aesthetic_head)}


class TestPickScore(BuiltIn):
    def make(self, files, folder):
        return {"kind": "pickscore", "model_dir": str(files.pickscore_dir), "name": "pick"}


class TestReference(BuiltIn):
    def make(self, files, folder):
        for i, image in enumerate(random_images(3, seed=9)):
            pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
            Image.fromarray(pixels).save(folder / f"ref{i}.png")
        return {"kind": "reference", "model": str(files.clip_config),
                "weights": str(files.clip_weights), "references": str(folder)}


class TestReferencePaired(BuiltIn):
    """Paired: image i against reference i, so every call scores four images (the batch and
    NaN tests score fewer or spoil one: the mean mode's class above runs them)."""

    def make(self, files, folder):
        for i, image in enumerate(random_images(4, seed=9)):
            pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
            Image.fromarray(pixels).save(folder / f"ref{i}.png")
        return {"kind": "reference", "model": str(files.clip_config), "mode": "paired",
                "weights": str(files.clip_weights), "references": str(folder)}

    def test_a_batch_scores_as_its_images_one_by_one(self, scorer):
        pytest.skip("paired: one reference per image, four at a time")


class TestSanity(BuiltIn):
    nan_image_scores_nan = False  # a NaN image is the `nonfinite` penalty, by design

    def make(self, files, folder):
        return {"kind": "sanity"}
