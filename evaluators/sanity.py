"""A penalty for degenerate probes: non-finite, black, flat or clipped images.

A fine image scores 0; a bad one scores minus the sum of the penalties of the checks it fails
(defaults: ``nonfinite`` 4, ``black`` 1, ``flat`` 1, ``clipped`` 1, so an all-black image
scores −3). A non-finite image is reported as ``nonfinite`` only. ``combine`` adds this
penalty to the objective rather than averaging it in, so fine probes cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field, FiniteFloat, field_validator
from torch import Tensor

from evaluators.scorer import ScorerConfig, check_images, register_scorer

CHECKS = ("nonfinite", "black", "flat", "clipped")
DEFAULT_PENALTIES = {"nonfinite": 4.0, "black": 1.0, "flat": 1.0, "clipped": 1.0}


class SanityConfig(ScorerConfig):
    """Thresholds and per-check penalties of the ``sanity`` scorer.

    ``black``: mean brightness below ``black_mean``. ``flat``: pixel standard deviation below
    ``flat_std``. ``clipped``: more than ``clipped_fraction`` of channel values within 1/255 of
    0 or 1 (blown-out highlights, crushed or saturated primaries: what a diverged merge draws).

    Example:
        >>> SanityConfig(flat_std=0.05).penalties["black"]
        1.0
    """

    kind: Literal["sanity"] = "sanity"
    black_mean: float = Field(0.02, ge=0, le=1)
    flat_std: FiniteFloat = Field(0.02, ge=0)
    clipped_fraction: float = Field(0.5, gt=0, le=1)
    penalties: dict[str, FiniteFloat] = Field(default_factory=lambda: dict(DEFAULT_PENALTIES))
    penalty: ClassVar[bool] = True

    @field_validator("penalties")
    @classmethod
    def _known_checks(cls, penalties: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(penalties) - set(CHECKS))
        if unknown:
            raise ValueError(f"unknown sanity checks {unknown}; known: {', '.join(CHECKS)}")
        return {**DEFAULT_PENALTIES, **penalties}


class SanityScorer:
    """0 for fine images, negative for degenerate ones; ``check``/``explain`` say why.

    Example:
        >>> scorer = SanityScorer.from_config(SanityConfig(), torch.device("cpu"), torch.float32)
        >>> scorer.explain(torch.zeros(1, 3, 8, 8))
        ['black,flat,clipped']
    """

    def __init__(self, name: str, config: SanityConfig) -> None:
        self.name = name
        self.config = config

    @classmethod
    def from_config(cls, config: SanityConfig, device: torch.device,
                    dtype: torch.dtype) -> SanityScorer:
        return cls(config.label, config)  # no model: runs wherever the images are

    @torch.no_grad()
    def check(self, images: Tensor) -> dict[str, Tensor]:
        """Per check, a bool ``[N]`` tensor (on CPU) that is True where the image fails it."""
        check_images(images)
        flat = images.flatten(1).float()
        nonfinite = ~torch.isfinite(flat).all(dim=1)
        finite = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
        edge = 1.0 / 255.0
        clipped = ((finite <= edge) | (finite >= 1.0 - edge)).float().mean(dim=1)
        failed = {
            "nonfinite": nonfinite,
            "black": finite.mean(dim=1) < self.config.black_mean,
            "flat": finite.std(dim=1, correction=0) < self.config.flat_std,
            "clipped": clipped > self.config.clipped_fraction,
        }
        return {name: (bad & ~nonfinite if name != "nonfinite" else bad).cpu()
                for name, bad in failed.items()}

    def explain(self, images: Tensor) -> list[str]:
        """Per image, the failed checks joined by commas ("" when the image is fine)."""
        failed = self.check(images)
        return [",".join(name for name in CHECKS if failed[name][i])
                for i in range(images.shape[0])]

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_images(images, prompts)
        failed = self.check(images)
        total = torch.zeros(images.shape[0], dtype=torch.float32)
        for name in CHECKS:
            total -= failed[name].float() * self.config.penalties[name]
        return total


register_scorer("sanity", SanityConfig, SanityScorer.from_config)
