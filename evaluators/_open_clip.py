"""An open_clip model on one device: tensor preprocessing, normalised embeddings, text cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor

from evaluators._image_ops import RESIZE_MODES, ImagePreprocess
from evaluators.scorer import batches
from evaluators.scorer_files import ConfigFile, ConfigPath, require_file

# An open_clip model name, or the path of a model-config .json (a file field only then).
OpenClipModel = Annotated[str, ConfigFile(suffixes=(".json",))]


class OpenClipFiles(BaseModel):
    """Mixin for configs that load an open_clip model from local files.

    ``model`` is an open_clip model name (``ViT-L-14-quickgelu``) or the path of a model-config
    JSON (its file stem becomes the name); ``weights`` is a local ``.safetensors`` / ``.pt`` /
    ``.bin`` file as ``open_clip.create_model_and_transforms(name, pretrained=...)`` reads it.
    """

    model: OpenClipModel
    weights: ConfigPath
    resize_mode: str | None = None  # override the model's own preprocess resize mode

    def check_open_clip_files(self) -> None:
        if self.model.endswith(".json"):
            require_file(Path(self.model), "model config", ["open_clip_config"])
        elif self.model.replace("/", "-") not in _open_clip().list_models():
            raise ValueError(f"open_clip has no model named {self.model!r}; give a model name from "
                             "open_clip.list_models() or the path of a model-config .json")
        require_file(self.weights, "weights", ["safetensors", "torch"])
        if self.resize_mode is not None and self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, "
                             f"got {self.resize_mode!r}")


def _open_clip():
    """open_clip, imported on first use: it pulls in torchvision (seconds), which commands that
    only read a config, such as ``mergesearch merge``, must not pay."""
    import open_clip

    return open_clip


def open_clip_name(model: str) -> str:
    """The registry name for ``model``, registering a model-config JSON path first."""
    if model.endswith(".json"):
        _open_clip().add_model_config(Path(model))
        return Path(model).stem
    return model


def open_clip_preprocess(cfg: dict, resize_mode: str | None = None) -> ImagePreprocess:
    """The tensor twin of the eval transform open_clip builds from a model's ``preprocess_cfg``
    (``create_model_and_transforms(..., image_resize_mode=resize_mode)``)."""
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"],) * 2
    return ImagePreprocess(
        size=tuple(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        # open_clip maps every interpolation but 'bilinear' (including 'random') to bicubic
        interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
        resize_mode=resize_mode or cfg.get("resize_mode", "shortest"),
        fill=int(cfg.get("fill_color", 0)), reference="open_clip",
    )


class OpenClipBackbone:
    """Embeds images and prompts with one open_clip model; embeddings are L2-normalised float32.

    Prompt embeddings are computed one prompt at a time and cached by text, so a prompt's
    embedding never depends on which other prompts were scored with it.

    Example:
        >>> backbone = OpenClipBackbone.load("ViT-L-14-quickgelu", weights,
        ...                                  torch.device("cuda"), torch.float16)  # doctest: +SKIP
        >>> backbone.encode_images(images).norm(dim=-1)                         # doctest: +SKIP
        tensor([1.0000, 1.0000])
    """

    def __init__(self, model: torch.nn.Module, tokenizer: object, preprocess: ImagePreprocess,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype
        self._text_cache: dict[str, Tensor] = {}

    @classmethod
    def load(cls, model: str, weights: Path, device: torch.device, dtype: torch.dtype,
             resize_mode: str | None = None) -> OpenClipBackbone:
        name = open_clip_name(model)
        open_clip = _open_clip()
        clip, _, _ = open_clip.create_model_and_transforms(name, pretrained=str(weights),
                                                           weights_only=True)
        clip = clip.to(device=device, dtype=dtype)
        preprocess = open_clip_preprocess(clip.visual.preprocess_cfg, resize_mode)
        return cls(clip, open_clip.get_tokenizer(name), preprocess, device, dtype)

    @property
    def embed_dim(self) -> int:
        """Width of the image embedding (what a head on top of it must take)."""
        return int(self.model.visual.output_dim)

    @torch.no_grad()
    def encode_images(self, images: Tensor | Sequence[Tensor], batch_size: int = 8) -> Tensor:
        """``[N, 3, H, W]`` in [0, 1] (or a list of ``[3, H, W]`` of any sizes) → ``[N, D]`` on CPU.

        Each chunk is moved to the model's device before preprocessing, so images drawn on the
        GPU stay there.
        """
        if isinstance(images, Tensor):
            chunks = [images[s] for s in batches(images.shape[0], batch_size)]
        else:  # images of different sizes: preprocess one by one
            chunks = [image[None] for image in images]
        out = [self.model.encode_image(self.preprocess(c.to(self.device)).to(self.dtype))
               for c in chunks]
        return F.normalize(torch.cat(out).float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, prompts: Sequence[str]) -> Tensor:
        """``[N, D]`` L2-normalised prompt embeddings on CPU, cached by prompt text."""
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._text_cache:
                tokens = self.tokenizer([prompt]).to(self.device)
                embedding = self.model.encode_text(tokens).float()
                self._text_cache[prompt] = F.normalize(embedding, dim=-1)[0].cpu()
        return torch.stack([self._text_cache[p] for p in prompts])
