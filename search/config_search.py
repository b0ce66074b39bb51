"""The study config's search-strategy options: block screening, cheap first probes
(multi-fidelity) and structured warm starts (smooth curves over depth). Part of the study
config (``search.config``); validated with it, errors named by field path.

Example (in a study YAML)::

    screening: {after: 62, threshold: 0.1}       # fix the blocks that barely move the score
    fidelity: {steps: 2, keep: 0.5}               # score every candidate cheaply first
    warm_start: {curves: 8}                       # 8 smooth ratio curves before the sampler
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScreeningConfig(_Strict):
    """Block screening (``search.screening``): once ``after`` trials are COMPLETE (default:
    twice the searched parameters plus 10, the fewest it accepts), each searched parameter's
    influence on the score is estimated from them, and every parameter whose influence is
    below ``threshold`` times the strongest one's is fixed at the best trial's value for the
    rest of the study (said in the run log and the dashboard's study note)."""

    after: int | None = Field(None, ge=10)
    threshold: float = Field(0.1, gt=0.0, lt=1.0)


class FidelityConfig(_Strict):
    """Cheap first probes (``search.fidelity``): every candidate is first drawn with ``steps``
    sampling steps (fewer than the probes'); only those whose cheap score ranks in the best
    ``keep`` share of the study's cheap scores so far are drawn with the full probes. The others
    are recorded PRUNED with their cheap score (``cheap_score``) and cost no budget. The first
    ``warmup`` candidates are always drawn in full."""

    steps: int = Field(ge=1)
    keep: float = Field(0.5, gt=0.0, lt=1.0)
    warmup: int = Field(10, ge=1)
