"""PickScore: a transformers ``CLIPModel`` (CLIP-H) fine-tuned on human preferences.

Score = ``logit_scale.exp() · cos(image_emb, text_emb)``; typical SD range 18–23, comparable
only within one prompt. The model loads from a local folder; preprocessing reads the folder's
``preprocessor_config.json`` (shortest-edge resize, centre crop, mean/std) and repeats what
``CLIPImageProcessor`` does to the same 8-bit image, with tensor ops on the scorer's device
(``evaluators._image_ops``): the pixel values are the processor's to the bit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluators._image_ops import ImagePreprocess
from evaluators.scorer import (
    ConfigFolder,
    ScorerConfig,
    batches,
    check_images,
    register_scorer,
    require_dir,
)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL resample codes CLIPImageProcessor stores
# CLIPImageProcessor's defaults (OpenAI CLIP's), for configs that leave them out
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PickScoreConfig(ScorerConfig):
    """Config for ``pickscore``: the model folder and (if separate) the processor folder.

    Example:
        >>> PickScoreConfig(model_dir="PickScore_v1",
        ...                 processor_dir="CLIP-ViT-H-14-laion2B-s32B-b79K")  # doctest: +SKIP
    """

    kind: Literal["pickscore"] = "pickscore"
    model_dir: ConfigFolder
    processor_dir: ConfigFolder | None = None  # tokenizer + preprocessor_config.json; default model_dir
    default_range: ClassVar[tuple[float, float]] = (18.0, 23.0)

    @property
    def processor_folder(self) -> Path:
        return self.processor_dir or self.model_dir

    def check_files(self) -> None:
        require_dir(self.model_dir, "model_dir", ["config.json"])
        if not any((self.model_dir / name).is_file() for name in _WEIGHT_FILES):
            raise ValueError(f"model_dir folder {self.model_dir} holds none of "
                             f"{', '.join(_WEIGHT_FILES)}")
        require_dir(self.processor_folder, "processor_dir" if self.processor_dir else "model_dir",
                    ["preprocessor_config.json"])
        if not any((self.processor_folder / name).is_file() for name in _TOKENIZER_FILES):
            raise ValueError(f"processor folder {self.processor_folder} holds no tokenizer "
                             f"({' or '.join(_TOKENIZER_FILES)})")
        _preprocess_from(self.processor_folder / "preprocessor_config.json")


class PickScoreScorer:
    """PickScore per image against its prompt; built by ``build_scorer``.

    Example:
        >>> config = PickScoreConfig(model_dir="PickScore_v1")     # doctest: +SKIP
        >>> scorer = build_scorer(config, device="cuda")            # doctest: +SKIP
        >>> scorer.score(images, ["a cat", "a dog"])                # doctest: +SKIP
        tensor([21.4, 20.9])
    """

    def __init__(self, name: str, model: Any, tokenizer: Any, preprocess: ImagePreprocess,
                 device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        self.name = name
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self._text_cache: dict[str, Tensor] = {}

    @classmethod
    def from_config(cls, config: PickScoreConfig, device: torch.device,
                    dtype: torch.dtype) -> PickScoreScorer:
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(config.model_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(config.processor_folder, local_files_only=True)
        preprocess = _preprocess_from(config.processor_folder / "preprocessor_config.json")
        return cls(config.label, model, tokenizer, preprocess, device, dtype, config.batch_size)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.float().exp())

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings ``[N, D]`` (float32, CPU)."""
        out = []
        for s in batches(images.shape[0], self.batch_size):
            pixels = self.preprocess(images[s].to(self.device)).to(self.dtype)
            out.append(_features(self.model.get_image_features(pixel_values=pixels)))
        return F.normalize(torch.cat(out).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised prompt embeddings ``[N, D]`` (float32, CPU), one prompt at a time,
        cached by text."""
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._text_cache:
                tokens = self.tokenizer([prompt], padding=True, truncation=True, max_length=77,
                                        return_tensors="pt").to(self.device)
                features = _features(self.model.get_text_features(**tokens)).float()
                self._text_cache[prompt] = F.normalize(features, dim=-1)[0].cpu()
        return torch.stack([self._text_cache[p] for p in prompts])

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts)
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)
        return self.logit_scale * cosine


def _features(output: Any) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected feature.
    return output if isinstance(output, Tensor) else output.pooler_output


def _preprocess_from(path: Path) -> ImagePreprocess:
    """``CLIPImageProcessor``'s steps as its ``preprocessor_config.json`` sets them (missing
    keys take the processor's defaults); settings it could not match are refused, naming the
    file and the key."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("do_resize", "do_rescale", "do_normalize"):
        if not config.get(key, True):
            raise ValueError(f"{path}: {key}=false is not supported (CLIP processors resize, "
                             "rescale and normalise)")
    resample = config.get("resample", 3)
    if resample not in _RESAMPLE:
        raise ValueError(f"{path}: resample={resample} is not supported; use 2 (bilinear) or "
                         "3 (bicubic)")
    size = config.get("size", {"shortest_edge": 224})
    size = {"shortest_edge": size} if isinstance(size, int) else size
    crop = config.get("crop_size", {"height": 224, "width": 224})
    crop_hw = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
    center_crop = bool(config.get("do_center_crop", True))
    if "shortest_edge" in size:
        mode, shortest, model_hw = "shortest", size["shortest_edge"], crop_hw
    elif "height" in size and "width" in size and (not center_crop or
                                                   crop_hw == (size["height"], size["width"])):
        mode, shortest, model_hw = "squash", None, (size["height"], size["width"])
    else:
        raise ValueError(f"{path}: size {size} with crop_size {crop} is not supported; give "
                         "shortest_edge, or height and width equal to the crop")
    return ImagePreprocess(
        size=model_hw,
        mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
        interpolation=_RESAMPLE[resample], resize_mode=mode, shortest_edge=shortest,
        reference="transformers", center_crop=center_crop,
        rescale_factor=float(config.get("rescale_factor", 1 / 255)),
    )


register_scorer("pickscore", PickScoreConfig, PickScoreScorer.from_config)
