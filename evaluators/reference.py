"""Similarity to reference images: CLIP image-image cosine (L2-normalised embeddings).

Two modes: ``mean`` scores each image by its mean cosine to every reference (a style or
look to move towards); ``paired`` scores image *i* against reference *i* (the references were
drawn with the same probe set, e.g. from a target merge, so index *i* is the same prompt and
seed). References come from a folder (sorted by file name) or, in memory, from
``set_references``. Typical range used by ``combine``: 0.5–1.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from evaluators._image_ops import IMAGE_SUFFIXES, load_image_folder
from evaluators._open_clip import OpenClipBackbone, OpenClipFiles
from evaluators.scorer import ConfigFolder, ScorerConfig, check_images, register_scorer


class ReferenceConfig(OpenClipFiles, ScorerConfig):
    """Config for ``reference``: CLIP model files, an optional image folder and the mode.

    Example:
        >>> ReferenceConfig(model="ViT-L-14", weights="clip.safetensors",
        ...                 references="refs/", mode="mean")  # doctest: +SKIP
    """

    kind: Literal["reference"] = "reference"
    references: ConfigFolder | None = None
    mode: Literal["mean", "paired"] = "mean"
    default_range: ClassVar[tuple[float, float]] = (0.5, 1.0)

    def has_residuals(self) -> bool:
        return self.mode == "paired"

    def check_files(self) -> None:
        self.check_open_clip_files()
        if self.references is None:
            return
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in self.references.iterdir()):
            raise ValueError(f"references folder {self.references} holds no "
                             f"{'/'.join(IMAGE_SUFFIXES)} images")


class ReferenceScorer:
    """Cosine similarity of each image to reference images; built by ``build_scorer``.

    Example:
        >>> config = ReferenceConfig(model=m, weights=w, mode="paired")  # doctest: +SKIP
        >>> scorer = build_scorer(config)                                 # doctest: +SKIP
        >>> scorer.set_references(generate(target_pipe, probes).images)  # doctest: +SKIP
        >>> scorer.score(generate(pipe, probes).images, prompts)         # doctest: +SKIP
    """

    def __init__(self, name: str, backbone: OpenClipBackbone, mode: str, batch_size: int,
                 references: Tensor | Sequence[Tensor] | None = None) -> None:
        self.name = name
        self.backbone = backbone
        self.mode = mode
        self.batch_size = batch_size
        self.reference_embeddings: Tensor | None = None
        if references is not None:
            self.set_references(references)

    @classmethod
    def from_config(cls, config: ReferenceConfig, device: torch.device,
                    dtype: torch.dtype) -> ReferenceScorer:
        backbone = OpenClipBackbone.load(config.model, config.weights, device, dtype,
                                         config.resize_mode)
        references = load_image_folder(config.references) if config.references else None
        return cls(config.label, backbone, config.mode, config.batch_size, references)

    def set_references(self, images: Tensor | Sequence[Tensor]) -> None:
        """Embed reference images (``[R, 3, H, W]`` in [0, 1], or a list of any sizes) once;
        the embeddings stay on the scorer's device, like its weights."""
        if isinstance(images, Tensor):
            check_images(images)
        embeddings = self.backbone.encode_images(images, self.batch_size)
        self.reference_embeddings = embeddings.to(self.backbone.device)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[N, D]`` (float32, CPU)."""
        return self.backbone.encode_images(images, self.batch_size)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.score_with_residuals(images, prompts)[0]

    def score_with_residuals(self, images: Tensor, prompts: Sequence[str]
                             ) -> tuple[Tensor, Tensor | None]:
        """The scores, and in paired mode the residuals ``e_i - r_i`` ``[N, D]`` (CPU): for unit
        embeddings ``e_i . r_i = 1 - |e_i - r_i|^2 / 2`` (``HasResiduals``)."""
        check_images(images, prompts)
        references = self.reference_embeddings
        if references is None:
            raise ValueError(f"scorer {self.name!r} has no references: set `references` in its "
                             "config or call set_references(images)")
        embeddings = self.image_embeddings(images).to(references.device)
        if self.mode == "mean":
            return (embeddings @ references.T).mean(dim=-1).cpu(), None
        if references.shape[0] != embeddings.shape[0]:
            raise ValueError(f"scorer {self.name!r} is paired: {embeddings.shape[0]} images but "
                             f"{references.shape[0]} references (draw both with one probe set)")
        return (embeddings * references).sum(dim=-1).cpu(), (embeddings - references).cpu()


register_scorer("reference", ReferenceConfig, ReferenceScorer.from_config)
