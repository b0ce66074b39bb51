"""The LAION improved aesthetic predictor: a linear head on L2-normalised CLIP image embeddings.

The released head (``sac+logos+ava1-l14-linearMSE.pth``) takes OpenAI CLIP ViT-L/14 image
embeddings, which need QuickGELU in open_clip (``ViT-L-14-quickgelu``). Scores are about 1–10;
``combine`` treats 4–7 as the typical range of SD outputs. The head's input width follows the
embedding width, so any open_clip model works with a head trained on its embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from evaluators._aesthetic_head import AestheticHead
from evaluators._open_clip import OpenClipBackbone, OpenClipFiles, OpenClipModel
from evaluators.scorer import (
    ConfigPath,
    ScorerConfig,
    ScorerError,
    check_images,
    register_scorer,
    require_file,
)


class LaionAestheticConfig(OpenClipFiles, ScorerConfig):
    """Config for ``laion_aesthetic``: the CLIP model files plus the head ``.pth``.

    ``weights`` is OpenAI ViT-L/14 in a file open_clip reads (``.safetensors``, ``.bin``,
    ``.pt``); the default ``model`` gives it the QuickGELU activations it was trained with.

    Example:
        >>> LaionAestheticConfig(weights="ViT-L-14.pt",
        ...                      head="sac+logos+ava1-l14-linearMSE.pth")  # doctest: +SKIP
    """

    kind: Literal["laion_aesthetic"] = "laion_aesthetic"
    model: OpenClipModel = "ViT-L-14-quickgelu"
    head: ConfigPath
    default_range: ClassVar[tuple[float, float]] = (4.0, 7.0)

    def check_files(self) -> None:
        self.check_open_clip_files()
        require_file(self.head, "head", ["torch"])


class LaionAestheticScorer:
    """Aesthetic score per image (prompts are ignored); built by ``build_scorer``.

    Example:
        >>> config = LaionAestheticConfig(weights=clip_file, head=head_file)  # doctest: +SKIP
        >>> build_scorer(config).score(images, prompts)                       # doctest: +SKIP
        tensor([5.9, 6.3])
    """

    def __init__(self, name: str, backbone: OpenClipBackbone, head: AestheticHead,
                 batch_size: int) -> None:
        self.name = name
        self.backbone = backbone
        self.head = head.to(backbone.device).eval().requires_grad_(False)
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, config: LaionAestheticConfig, device: torch.device,
                    dtype: torch.dtype) -> LaionAestheticScorer:
        backbone = OpenClipBackbone.load(config.model, config.weights, device, dtype,
                                         config.resize_mode)
        state = torch.load(config.head, map_location="cpu", weights_only=True)
        try:
            head = AestheticHead.from_state_dict(state)
        except (ValueError, RuntimeError) as error:
            raise ScorerError(f"scorer {config.label!r} (laion_aesthetic): head {config.head}: "
                              f"{error}") from error
        if head.in_features != backbone.embed_dim:
            raise ScorerError(
                f"scorer {config.label!r} (laion_aesthetic): head {config.head} takes "
                f"{head.in_features}-wide embeddings but model {config.model!r} gives "
                f"{backbone.embed_dim}; pair the head with the CLIP model it was trained on"
            )
        return cls(config.label, backbone, head, config.batch_size)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[N, D]`` (float32, CPU): the head's input."""
        return self.backbone.encode_images(images, self.batch_size)

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts)
        embeddings = self.image_embeddings(images).to(self.backbone.device)
        return self.head(embeddings).squeeze(-1).float().cpu()


register_scorer("laion_aesthetic", LaionAestheticConfig, LaionAestheticScorer.from_config)
