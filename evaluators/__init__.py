"""Probe images from a diffusers pipeline and score them. Knows nothing of merging.

Example:
    >>> probes = ProbeSet.from_yaml("configs/probes.yaml")                 # doctest: +SKIP
    >>> configs = [scorer_config(c) for c in scorer_dicts]                  # doctest: +SKIP
    >>> scorers = [build_scorer(c, device="cuda") for c in configs]         # doctest: +SKIP
    >>> images, card = evaluate(pipe, probes, scorers)                      # doctest: +SKIP
    >>> value = combine(card, score_norms(configs))                         # doctest: +SKIP
"""

from evaluators._image_ops import load_image_folder
from evaluators.aesthetic import LaionAestheticConfig, LaionAestheticScorer
from evaluators.clip_score import ClipScoreConfig, HpsV2Config, TextImageScorer
from evaluators.pickscore import PickScoreConfig, PickScoreScorer
from evaluators.probes import ProbeImages, ProbeSet, Prompt, generate
from evaluators.reference import ReferenceConfig, ReferenceScorer
from evaluators.sanity import SanityConfig, SanityScorer
from evaluators.schedulers import SCHEDULERS
from evaluators.scorecard import (
    ScoreCard,
    combine,
    evaluate,
    normalised_means,
    objective_vector,
    score_images,
    score_norms,
)
from evaluators.scorer import (
    SCORERS,
    ConfigFile,
    ConfigFolder,
    ConfigPath,
    ExplainsScores,
    HasResiduals,
    ScoreNorm,
    Scorer,
    ScorerConfig,
    ScorerEntry,
    ScorerError,
    build_scorer,
    known_scorer_kinds,
    register_scorer,
    scorer_config,
    scorer_entry,
)

__all__ = [
    "SCHEDULERS",
    "SCORERS",
    "ClipScoreConfig",
    "ConfigFile",
    "ConfigFolder",
    "ConfigPath",
    "ExplainsScores",
    "HasResiduals",
    "HpsV2Config",
    "LaionAestheticConfig",
    "LaionAestheticScorer",
    "PickScoreConfig",
    "PickScoreScorer",
    "ProbeImages",
    "ProbeSet",
    "Prompt",
    "ReferenceConfig",
    "ReferenceScorer",
    "SanityConfig",
    "SanityScorer",
    "ScoreCard",
    "ScoreNorm",
    "Scorer",
    "ScorerConfig",
    "ScorerEntry",
    "ScorerError",
    "TextImageScorer",
    "build_scorer",
    "combine",
    "evaluate",
    "generate",
    "known_scorer_kinds",
    "load_image_folder",
    "normalised_means",
    "objective_vector",
    "register_scorer",
    "score_images",
    "score_norms",
    "scorer_config",
    "scorer_entry",
]
