"""A scorer with a file of its own: how close each image's mean brightness is to a target."""

from __future__ import annotations

import json
from typing import ClassVar

import torch

from evaluators import ScorerConfig
from evaluators.scorer import ConfigPath, check_images


class BrightnessConfig(ScorerConfig):
    target: ConfigPath  # a JSON file {"mean": 0.4}; relative paths resolve next to the YAML
    default_range: ClassVar[tuple[float, float]] = (-0.5, 0.0)

    def check_files(self) -> None:
        try:
            mean = json.loads(self.target.read_text())["mean"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"target file {self.target} holds no {{\"mean\": number}}: "
                             f"{exc}") from None
        if not 0.0 <= float(mean) <= 1.0:
            raise ValueError(f"target file {self.target}: mean {mean} is outside [0, 1]")


class Brightness:
    """Minus the distance of each image's mean from the target mean (higher is better)."""

    config_class = BrightnessConfig

    def __init__(self, name: str, target: float, device: torch.device, dtype: torch.dtype):
        self.name = name
        self.device, self.dtype = device, dtype
        self.target = torch.tensor(target, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, config: BrightnessConfig, device: torch.device,
                    dtype: torch.dtype) -> Brightness:
        mean = float(json.loads(config.target.read_text())["mean"])
        return cls(config.label, mean, device, dtype)

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        check_images(images, prompts)
        means = images.to(self.device, self.dtype).mean(dim=(1, 2, 3))
        return -(means - self.target).abs().float().cpu()
