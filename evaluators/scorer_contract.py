"""The contract every scorer passes, built in or a plug-in: a pytest class to subclass.

In a test module of yours::

    from evaluators.scorer_contract import ScorerContract

    class TestBrightness(ScorerContract):
        def config(self, folder):
            (folder / "target.json").write_text('{"mean": 0.5}')
            return {"kind": "my_package.scorers:Brightness", "target": str(folder / "target.json")}

pytest then runs every ``test_*`` below against it, on random 8-bit images:
- it meets the ``Scorer`` protocol: one float score per image, on the CPU, named by the config;
- scores are finite on normal images, the same twice and after a rebuild (bit for bit);
- a batch scores as its images one by one (within ``tolerance``, absolute; CPU matmuls block
  differently for different batch sizes);
- an image holding NaN scores NaN (or, ``nan_image_scores_nan = False``, a finite penalty)
  and changes no other image's score;
- ``build_scorer(config, device, dtype)`` puts every tensor the scorer holds on that device
  and its model's weights in that dtype (float32 and bfloat16 on the CPU; on CUDA too where
  there is one, float32 scores within ``cuda_tolerance`` of the CPU's);
- its config refuses an unknown field, and a missing file in each file field
  (``ConfigPath``), with a message naming the field and the path;
- where its config says it gives residuals (``has_residuals``), ``score_with_residuals`` scores
  as ``score`` does and each image's score is ``1 - |d|^2 / 2`` of its residual ``d``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from evaluators.scorer import (
    HasResiduals,
    Scorer,
    ScorerError,
    build_scorer,
    file_fields,
    scorer_config,
)

PROMPTS = ("a red circle", "a blue square on grey", "a cat", "a green triangle")


def random_images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``[n, 3, size, size]`` images in [0, 1], quantised to 8 bits as probes are."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).round() / 255


def held_objects(obj: Any, depth: int = 0, seen: set[int] | None = None
                 ) -> Iterator[torch.Tensor | torch.nn.Module]:
    """Every tensor and module an object holds, and those of the objects it holds (a few
    levels deep)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 4:
        return
    seen.add(id(obj))
    if isinstance(obj, (torch.Tensor, torch.nn.Module)):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from held_objects(item, depth + 1, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from held_objects(item, depth + 1, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for item in vars(obj).values():
            yield from held_objects(item, depth + 1, seen)


class ScorerContract:
    """Subclass with ``config(folder)``: a valid config mapping (write its files into
    ``folder``). See the module docstring for what is checked."""

    tolerance: ClassVar[float] = 1e-5
    cuda_tolerance: ClassVar[float] = 1e-2
    nan_image_scores_nan: ClassVar[bool] = True

    def config(self, folder: Path) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}: return a config mapping")

    def prepare(self, scorer: Scorer) -> Scorer:
        """Anything a scorer needs after it is built (e.g. reference images); default none."""
        return scorer

    # ------------------------------------------------------------------ fixtures
    @pytest.fixture(scope="class")
    @classmethod
    def config_data(cls, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
        return cls().config(tmp_path_factory.mktemp("scorer_files"))

    @pytest.fixture(scope="class")
    @classmethod
    def scorer(cls, config_data) -> Scorer:
        return cls().prepare(build_scorer(config_data, device="cpu", dtype=torch.float32))

    # ------------------------------------------------------------------ the contract
    def test_meets_the_protocol(self, scorer, config_data):
        assert isinstance(scorer, Scorer)
        assert scorer.name == scorer_config(config_data).label
        scores = scorer.score(random_images(), list(PROMPTS))
        assert isinstance(scores, torch.Tensor) and scores.shape == (4,)
        assert scores.is_floating_point() and scores.device.type == "cpu"

    def test_finite_deterministic_and_the_same_after_a_rebuild(self, scorer, config_data):
        images = random_images(seed=1)
        first = scorer.score(images, list(PROMPTS))
        assert torch.isfinite(first).all(), first
        assert torch.equal(scorer.score(images, list(PROMPTS)), first)
        again = self.prepare(build_scorer(config_data, device="cpu", dtype=torch.float32))
        assert torch.equal(again.score(images, list(PROMPTS)), first)

    def test_a_batch_scores_as_its_images_one_by_one(self, scorer):
        images = random_images(seed=2)
        batched = scorer.score(images, list(PROMPTS))
        single = torch.cat([scorer.score(images[i:i + 1], [PROMPTS[i]]) for i in range(4)])
        torch.testing.assert_close(batched, single, rtol=0, atol=self.tolerance)

    def test_a_nan_image_spoils_only_its_own_score(self, scorer):
        images = random_images(seed=3)
        clean = scorer.score(images, list(PROMPTS))
        spoiled = images.clone()
        spoiled[1, :, 5:9, 5:9] = float("nan")
        scores = scorer.score(spoiled, list(PROMPTS))
        if self.nan_image_scores_nan:
            assert torch.isnan(scores[1]), scores
        else:
            assert torch.isfinite(scores[1]) and scores[1] < clean[1], scores
        others = [0, 2, 3]
        torch.testing.assert_close(scores[others], clean[others], rtol=0, atol=self.tolerance)

    def test_residuals_where_the_config_says_it_gives_them(self, scorer, config_data):
        images, prompts = random_images(seed=4), list(PROMPTS)
        gives = scorer_config(config_data).has_residuals()
        if not isinstance(scorer, HasResiduals):
            assert not gives, "has_residuals() is True but the scorer has no score_with_residuals"
            return
        values, residuals = scorer.score_with_residuals(images, prompts)
        assert torch.equal(values, scorer.score(images, prompts))
        if not gives:
            assert residuals is None
            return
        assert residuals.ndim == 2 and residuals.shape[0] == 4 and residuals.device.type == "cpu"
        torch.testing.assert_close(1 - residuals.double().pow(2).sum(-1) / 2, values.double(),
                                   rtol=0, atol=self.tolerance)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_device_and_dtype_are_honoured(self, config_data, dtype):
        self._score_on(["cpu"], config_data, dtype)

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_cuda_is_honoured_and_matches_cpu(self, config_data, dtype):
        results = self._score_on(["cpu", "cuda"], config_data, dtype)
        if dtype == torch.float32:
            torch.testing.assert_close(results["cuda"], results["cpu"], rtol=0,
                                       atol=self.cuda_tolerance)

    def _score_on(self, devices, config_data, dtype) -> dict[str, torch.Tensor]:
        images = random_images(seed=4)
        results = {}
        for device in devices:
            scorer = self.prepare(build_scorer(config_data, device=device, dtype=dtype))
            weights = []
            for held in held_objects(scorer):
                tensors = [held] if isinstance(held, torch.Tensor) else \
                    [*held.parameters(), *held.buffers()]
                for tensor in tensors:
                    assert tensor.device.type == device, (device, tensor.device, tensor.shape)
                if isinstance(held, torch.nn.Module):
                    weights.append({p.dtype for p in held.parameters() if p.is_floating_point()})
            # the model runs in the dtype asked (a small head may stay in float32)
            assert not weights or {dtype} in weights, (dtype, weights)
            results[device] = scorer.score(images, list(PROMPTS))
            assert results[device].device.type == "cpu"
            assert torch.isfinite(results[device]).all(), (device, dtype, results[device])
        return results

    def test_config_errors_name_the_field(self, config_data, tmp_path):
        with pytest.raises(ScorerError, match="no_such_field"):
            scorer_config({**config_data, "no_such_field": 1})
        fields = file_fields(type(scorer_config(config_data)))
        for field, marker in fields.items():
            if not marker.applies(config_data.get(field)):
                continue
            missing = tmp_path / f"missing{marker.suffixes[0] if marker.suffixes else ''}"
            with pytest.raises(ScorerError) as refused:
                scorer_config({**config_data, field: str(missing)})
            assert field in str(refused.value) and str(missing) in str(refused.value), \
                str(refused.value)
