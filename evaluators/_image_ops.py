"""CLIP-style image preprocessing as torch ops on batches, and image-folder loading.

Preprocessing works on each image of a batch independently (interpolate and crop are
per-sample), so a batch preprocesses to exactly the stack of its images preprocessed alone.
Resizing is antialiased like PIL's; results match PIL-based pipelines to within resampling
differences, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize (``shortest`` side + centre crop, ``longest`` side + pad, ``squash``), normalise."""

    size: tuple[int, int]  # (height, width) the model takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    shortest_edge: int | None = None  # resize target for "shortest" if it differs from size
    fill: float = 0.0  # pad value in [0, 1] for "longest"

    def __call__(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in [0, 1] → float32 ``[N, 3, *size]``, normalised."""
        images = images.to(torch.float32)
        if self.resize_mode == "squash":
            images = self._resize(images, self.size)
        elif self.resize_mode == "longest":
            images = self._pad(self._resize(images, self._fit(images, longest=True)))
        elif self.resize_mode == "shortest":
            images = self._center_crop(self._resize(images, self._fit(images, longest=False)))
        else:
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}")
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def _fit(self, images: Tensor, longest: bool) -> tuple[int, int]:
        h, w = images.shape[-2:]
        th, tw = self.size
        if not longest and self.shortest_edge is not None:
            th = tw = self.shortest_edge
        scale = min(th / h, tw / w) if longest else max(th / h, tw / w)
        return _scaled(h, scale, th), _scaled(w, scale, tw)

    def _resize(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(images.shape[-2:]) == tuple(size):
            return images
        if self.interpolation in ("bilinear", "bicubic"):
            out = F.interpolate(images, size=size, mode=self.interpolation, align_corners=False,
                                antialias=True)
        else:
            out = F.interpolate(images, size=size, mode=self.interpolation)
        # Bicubic overshoots; PIL's uint8 output is clamped to the valid range the same way.
        return out.clamp(0.0, 1.0)

    def _center_crop(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        th, tw = self.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return images[..., top : top + th, left : left + tw]

    def _pad(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        th, tw = self.size
        top, left = (th - h) // 2, (tw - w) // 2
        return F.pad(images, (left, tw - w - left, top, th - h - top), value=self.fill)


def _scaled(side: int, scale: float, target: int) -> int:
    # The side that meets the target exactly keeps it; the free side is truncated, as
    # torchvision's Resize and CLIPImageProcessor do.
    value = side * scale
    return target if abs(value - target) < 1e-6 else max(1, int(value))


def load_image_folder(folder: Path) -> list[Tensor]:
    """Every image in ``folder`` (sorted by file name) as float32 ``[3, H, W]`` in [0, 1]."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [load_image(p) for p in paths]


def load_image(path: Path) -> Tensor:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32) / 255.0
