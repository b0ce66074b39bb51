"""CLIP image preprocessing as batched tensor ops that equal the reference libraries, and
image-folder loading.

A probe image is a float tensor in [0, 1]; what a published scorer was run on is the 8-bit
image a pipeline saves (``round(255 · x)``, as diffusers' ``numpy_to_pil`` and our PNGs do).
``ImagePreprocess`` quantises to those bytes, then repeats one reference library's steps on
them with tensor ops on the images' device:

- ``open_clip``: the eval transform of ``open_clip.create_model_and_transforms`` on a PIL
  image — torchvision ``Resize`` (shortest side, long side truncated) or timm's
  ``ResizeKeepRatio`` (both sides rounded), Pillow's resampling, ``CenterCrop`` /
  ``CenterCropOrPad`` (offsets rounded half to even), ``ToTensor`` (``/ 255``), ``Normalize``.
- ``transformers``: ``CLIPImageProcessor`` (transformers 5, torchvision backend, on the CPU as
  it runs by default) — shortest-edge resize with torch's uint8 kernel, centre crop (offsets
  truncated), rescale and normalise fused as ``(x - 255·mean) / (255·std)``.

Pixel values come out identical to the reference's (the tests compare at several probe sizes).
Each image of a batch is processed independently, so a batch equals its images done alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from evaluators._resample import resize_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCES = ("open_clip", "transformers")
RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize, crop and normalise like ``reference`` does (see the module docstring).

    ``size`` is the (height, width) the model takes. ``resize_mode``: ``shortest`` side to the
    target then centre crop; ``longest`` side to the target then pad with ``fill`` (0..255);
    ``squash`` to ``size`` ignoring the aspect ratio. ``shortest_edge`` (transformers) resizes
    the shortest side to another length than the crop. ``center_crop=False`` keeps the resized
    image as it is (transformers' ``do_center_crop``).

    Example:
        >>> pre = ImagePreprocess(size=(224, 224), mean=(0.48, 0.46, 0.41),
        ...                       std=(0.27, 0.26, 0.28))
        >>> pre(torch.rand(2, 3, 512, 768)).shape
        torch.Size([2, 3, 224, 224])
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    shortest_edge: int | None = None
    fill: int = 0
    reference: str = "open_clip"
    center_crop: bool = True
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"unknown preprocessing reference {self.reference!r}; "
                             f"choose one of {REFERENCES}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}; "
                             f"choose one of {RESIZE_MODES}")
        if self.reference == "transformers" and self.resize_mode == "longest":
            raise ValueError("CLIPImageProcessor has no 'longest' resize mode")

    def __call__(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in [0, 1] → float32 ``[N, 3, *size]`` model input, on the same
        device. An image holding NaN or inf comes out all NaN, so its score is NaN."""
        pixels, bad = quantise(images)
        filter, target = self.resample_plan(tuple(pixels.shape[-2:]))
        style = "pil" if self.reference == "open_clip" else "torch"
        if target != tuple(pixels.shape[-2:]):
            pixels = resize_uint8(pixels, target, filter, style)
        if self.center_crop:
            pixels = self._crop(pixels)
        out = self._normalise(pixels)
        if bad.any():
            out[bad] = float("nan")
        return out

    def resample_plan(self, hw: tuple[int, int]) -> tuple[str, tuple[int, int]]:
        """(filter, resized (height, width)) for an image of ``hw``, as the reference sizes it."""
        if self.resize_mode == "squash":
            return self.interpolation, self.size
        if self.reference == "transformers":
            return self.interpolation, _shortest_side(hw, self.shortest_edge or min(self.size))
        if self.resize_mode == "longest":
            return self.interpolation, _keep_ratio(hw, self.size, longest=1.0)
        if self.size[0] == self.size[1]:
            return self.interpolation, _shortest_side(hw, self.size[0])
        # open_clip resizes towards a non-square target with ResizeKeepRatio, whose
        # interpolation is its default (bicubic) whatever the model's config says.
        return "bicubic", _keep_ratio(hw, self.size, longest=0.0)

    def _crop(self, pixels: Tensor) -> Tensor:
        h, w = pixels.shape[-2:]
        th, tw = self.size
        if th > h or tw > w:  # pad first, left/top getting the smaller half (both libraries)
            left, top = max(tw - w, 0) // 2, max(th - h, 0) // 2
            right, bottom = max(tw - w + 1, 0) // 2, max(th - h + 1, 0) // 2
            fill = self.fill if self.resize_mode == "longest" else 0
            pixels = F.pad(pixels, (left, right, top, bottom), value=fill)
            h, w = pixels.shape[-2:]
        if self.reference == "open_clip":  # torchvision: int(round(...)), half to even
            top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        else:  # transformers: int(...), truncated
            top, left = int((h - th) / 2.0), int((w - tw) / 2.0)
        return pixels[..., top : top + th, left : left + tw]

    def _normalise(self, pixels: Tensor) -> Tensor:
        x = pixels.to(torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device)
        if self.reference == "open_clip":  # ToTensor, then Normalize
            x = x.div(255)
        else:  # CLIPImageProcessor folds the rescale into mean and std
            mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
        return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def quantise(images: Tensor) -> tuple[Tensor, Tensor]:
    """(int32 ``round(255 · clamp(x, 0, 1))`` — the 8-bit image a pipeline saves —, a bool
    ``[N]`` marking images that hold NaN or inf, which are quantised as 0 there)."""
    x = images.to(torch.float32)
    bad = ~torch.isfinite(x).flatten(1).all(dim=1)
    x = x.clamp(0.0, 1.0)
    if bad.any():
        x = torch.nan_to_num(x, nan=0.0)  # infinities were clamped already
    return x.mul_(255).round_().to(torch.int32), bad


def _shortest_side(hw: tuple[int, int], target: int) -> tuple[int, int]:
    # torchvision's Resize(int) and transformers' get_resize_output_image_size: the long side
    # is int(target * long / short), truncated.
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(target * long / short)
    return (new_long, target) if w <= h else (target, new_long)


def _keep_ratio(hw: tuple[int, int], size: tuple[int, int], longest: float) -> tuple[int, int]:
    # open_clip's ResizeKeepRatio (from timm), in its own order of float operations.
    ratio_h, ratio_w = hw[0] / size[0], hw[1] / size[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    h, w = (round(x * 1.0 / ratio) for x in hw)
    return h, w


def load_image_folder(folder: Path) -> list[Tensor]:
    """Every image in ``folder`` (sorted by file name) as float32 ``[3, H, W]`` in [0, 1]."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [load_image(p) for p in paths]


def load_image(path: Path) -> Tensor:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32) / 255.0
