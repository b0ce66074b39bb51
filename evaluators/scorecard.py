"""Score cards and how per-scorer scores become one objective (or a vector of them).

Normalisation: each objective scorer has a fixed, documented typical raw range ``(low, high)``
(its config's ``range``, default per kind: clip 15–35, laion_aesthetic 4–7, hpsv2 0.20–0.30,
pickscore 18–23, reference 0.5–1.0) mapped affinely to (0, 1). Fixed constants rather than
statistics of a calibration set keep a trial's value independent of every other trial and
identical on every distributed worker. Per scorer, image values are averaged with the probe
set's prompt weights; objectives are then averaged with the scorers' weights; penalty scorers
(``sanity``) are added, raw, times their weight:

    combined = Σ_s w_s · m_s / Σ_s w_s + Σ_p w_p · m_p,     m = Σ_i p_i v_i / Σ_i p_i

A non-finite normalised value counts as 0 (the bottom of the typical range), so a NaN image
gives a finite, low score (and the sanity penalty) instead of a failed trial.

Example:
    >>> card = ScoreCard(raw={"clip": torch.tensor([30.0, 20.0])},
    ...                  prompt_weights=torch.tensor([3.0, 1.0]),
    ...                  prompts=["a cat", "a dog"], seeds=[0, 0])
    >>> combine(card, {"clip": ScoreNorm(low=15.0, high=35.0)})
    0.625
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from evaluators.probes import ProbeImages, ProbeSet, generate
from evaluators.scorer import ExplainsScores, HasResiduals, ScoreNorm, Scorer, ScorerConfig


@dataclass(frozen=True)
class ScoreCard:
    """Raw per-image values of every scorer for one set of probe images.

    ``raw`` maps scorer name → float32 ``[N]`` on CPU, in probe order; ``notes`` maps scorer
    name → per-image explanations from scorers that give them (``sanity``).

    Example:
        >>> card = score_images(probe_images, scorers)      # doctest: +SKIP
        >>> card.means()                                     # doctest: +SKIP
        {'clip': 27.3, 'sanity': 0.0}
    """

    raw: dict[str, Tensor]
    prompt_weights: Tensor
    prompts: list[str]
    seeds: list[int]
    notes: dict[str, list[str]] = field(default_factory=dict)
    # scorer name -> float32 [N, K] residuals, from scorers that give them (``HasResiduals``)
    residuals: dict[str, Tensor] = field(default_factory=dict)

    def weighted_mean(self, values: Tensor) -> float:
        """``Σ p_i v_i / Σ p_i`` over images, with the probe set's prompt weights ``p``."""
        weights = self.prompt_weights.to(torch.float64)
        return float((values.to(torch.float64) * weights).sum() / weights.sum())

    def weighted_residual(self, name: str) -> Tensor:
        """Scorer ``name``'s residuals as one float64 vector ``R``, image *i*'s scaled by
        ``sqrt(p_i / Σ p)``: its prompt-weighted mean score is then ``1 - |R|^2 / 2``."""
        weights = self.prompt_weights.to(torch.float64)
        scale = (weights / weights.sum()).sqrt()[:, None]
        return (self.residuals[name].to(torch.float64) * scale).flatten()

    def means(self) -> dict[str, float]:
        """Prompt-weighted mean raw value per scorer."""
        return {name: self.weighted_mean(values) for name, values in self.raw.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (for trial attributes and logs)."""
        return {
            "raw": {name: values.tolist() for name, values in self.raw.items()},
            "means": self.means(),
            "prompt_weights": self.prompt_weights.tolist(),
            "prompts": list(self.prompts),
            "seeds": list(self.seeds),
            "notes": {name: list(notes) for name, notes in self.notes.items()},
        }


def score_norms(configs: Sequence[ScorerConfig]) -> dict[str, ScoreNorm]:
    """Each config's ``ScoreNorm`` keyed by its label (the name its scorer reports)."""
    return {config.label: config.score_norm() for config in configs}


def normalised_means(card: ScoreCard, norms: Mapping[str, ScoreNorm]) -> dict[str, float]:
    """Prompt-weighted mean of each scorer's normalised values (penalties stay raw)."""
    missing = [name for name in norms if name not in card.raw]
    if missing:
        raise KeyError(f"score card has no values for {missing}; it has {sorted(card.raw)}")
    out = {}
    for name, norm in norms.items():
        values = norm.normalise(card.raw[name].to(torch.float64))
        out[name] = card.weighted_mean(torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0))
    return out


def combine(card: ScoreCard, norms: Mapping[str, ScoreNorm]) -> float:
    """One objective: weighted mean of normalised objectives plus weighted penalties.

    Scorers in the card but not in ``norms`` are kept in the card and ignored here (a
    held-out scorer, for example).
    """
    means = normalised_means(card, norms)
    objectives = {n: norm for n, norm in norms.items() if not norm.penalty and norm.weight > 0}
    total_weight = sum(norm.weight for norm in objectives.values())
    objective = (sum(norm.weight * means[n] for n, norm in objectives.items()) / total_weight
                 if total_weight else 0.0)
    return objective + _penalty(means, norms)


def objective_vector(card: ScoreCard, norms: Mapping[str, ScoreNorm]) -> list[float]:
    """One value per objective scorer (in ``norms`` order) for multi-objective search.

    Each is that scorer's normalised mean plus the total weighted penalty, so a degenerate
    candidate is dominated in every objective. Objective weights do not scale the values
    (Pareto fronts ignore them).
    """
    means = normalised_means(card, norms)
    penalty = _penalty(means, norms)
    return [means[n] + penalty for n, norm in norms.items() if not norm.penalty]


def _penalty(means: Mapping[str, float], norms: Mapping[str, ScoreNorm]) -> float:
    return sum(norm.weight * means[n] for n, norm in norms.items() if norm.penalty)


def score_images(images: ProbeImages, scorers: Sequence[Scorer]) -> ScoreCard:
    """Run every scorer on ``images`` and collect raw values (and explanations) in a card."""
    names = [scorer.name for scorer in scorers]
    if len(set(names)) != len(names):
        raise ValueError(f"scorer names must be unique (set `name` in the config): {names}")
    raw: dict[str, Tensor] = {}
    notes: dict[str, list[str]] = {}
    residuals: dict[str, Tensor] = {}
    for scorer in scorers:
        if isinstance(scorer, HasResiduals):
            values, residual = scorer.score_with_residuals(images.images, images.prompts)
            if residual is not None:
                residuals[scorer.name] = residual.detach().to("cpu", torch.float32)
        else:
            values = scorer.score(images.images, images.prompts)
        raw[scorer.name] = values.detach().to("cpu", torch.float32)
        if isinstance(scorer, ExplainsScores):
            notes[scorer.name] = scorer.explain(images.images)
    return ScoreCard(raw=raw, prompt_weights=images.weights.cpu(), prompts=list(images.prompts),
                     seeds=list(images.seeds), notes=notes, residuals=residuals)


def evaluate(pipe: Any, probe_set: ProbeSet, scorers: Sequence[Scorer],
             device: str | torch.device | None = None) -> tuple[ProbeImages, ScoreCard]:
    """Draw ``probe_set`` with ``pipe`` and score the images: one trial's evaluation."""
    images = generate(pipe, probe_set, device=device)
    return images, score_images(images, scorers)
