"""Text-image alignment with an open_clip model: CLIP score and HPSv2.

Both score an image against its own prompt as a scaled cosine of L2-normalised embeddings:
``clip`` is ``100 · cos`` (the usual CLIP score, not clamped at 0 here so per-image values keep
their sign), ``hpsv2`` is ``image_emb · text_emb`` with the HPS checkpoint (``{'state_dict': ...}``
``.pt``) on open_clip ViT-H-14. Typical raw ranges used by ``combine``: CLIP score 15–35,
HPSv2 0.20–0.30. HPS (like PickScore) is comparable only within one prompt, which a fixed
probe set guarantees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from evaluators._open_clip import OpenClipBackbone, OpenClipFiles, OpenClipModel
from evaluators.scorer import ScorerConfig, check_images, register_scorer


class ClipScoreConfig(OpenClipFiles, ScorerConfig):
    """CLIP score (``100 · cos``) with any open_clip model from local files.

    Example:
        >>> ClipScoreConfig(model="ViT-L-14", weights="clip-vit-l-14.safetensors")  # doctest: +SKIP
    """

    kind: Literal["clip"] = "clip"
    default_range: ClassVar[tuple[float, float]] = (15.0, 35.0)
    scale: ClassVar[float] = 100.0

    def check_files(self) -> None:
        self.check_open_clip_files()


class HpsV2Config(OpenClipFiles, ScorerConfig):
    """HPSv2 / v2.1: open_clip ViT-H-14 with the HPS ``.pt`` checkpoint as ``weights``.

    Example:
        >>> HpsV2Config(weights="HPS_v2.1_compressed.pt")  # doctest: +SKIP
    """

    kind: Literal["hpsv2"] = "hpsv2"
    model: OpenClipModel = "ViT-H-14"
    default_range: ClassVar[tuple[float, float]] = (0.20, 0.30)
    scale: ClassVar[float] = 1.0

    def check_files(self) -> None:
        self.check_open_clip_files()


class TextImageScorer:
    """``scale · cos(image, its prompt)`` with an open_clip backbone; built by ``build_scorer``.

    Example:
        >>> scorer = build_scorer({"kind": "clip", "model": "ViT-B-32",
        ...                        "weights": "b32.safetensors"})  # doctest: +SKIP
        >>> scorer.score(images, ["a cat", "a dog"])               # doctest: +SKIP
        tensor([31.2, 28.7])
    """

    def __init__(self, name: str, backbone: OpenClipBackbone, scale: float,
                 batch_size: int) -> None:
        self.name = name
        self.backbone = backbone
        self.scale = scale
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, config: ClipScoreConfig | HpsV2Config, device: torch.device,
                    dtype: torch.dtype) -> TextImageScorer:
        backbone = OpenClipBackbone.load(config.model, config.weights, device, dtype,
                                         config.resize_mode)
        return cls(config.label, backbone, config.scale, config.batch_size)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[N, D]`` (float32, CPU)."""
        return self.backbone.encode_images(images, self.batch_size)

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised prompt embeddings ``[N, D]`` (float32, CPU), cached per prompt."""
        return self.backbone.encode_texts(prompts)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts)
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
        return self.scale * cosine


register_scorer("clip", ClipScoreConfig, TextImageScorer.from_config)
register_scorer("hpsv2", HpsV2Config, TextImageScorer.from_config)
