"""Acceptance figures of a world that need no search: prompt following, style, sensitivity.

Everything goes through the code paths a user's study takes: checkpoints load with
``load_pipeline``, probes are drawn by ``evaluators.generate``, the CLIP model is loaded by the
`clip` / `reference` scorers, merges are written by the ``MergeEngine``.

- ``naming``: the base model draws every held-out prompt; the CLIP scorer names shape, colour
  and background zero-shot (each class embedding is the mean of the caption embeddings that
  hold it) and the shares named right are returned.
- ``style_probe``: a logistic regression on CLIP embeddings of drawn plain / A / B pictures
  classifies the probes of base, style_a and style_b: A's told from B's, the base's neither.
- ``sensitivity``: at a random hidden merge of style_a and style_b, each MBW block moved by
  +-0.3; the `reference` score's change per block, against the score's observed range.
- ``identifiability``: that table at a given hidden merge, and the ``Directions`` in ratio
  space the score sees there (blocks that change the pictures alike are one direction), each
  judged by the same rule (``benchmarks/search_quality.py``, issue 15).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from evaluators import ProbeSet, build_scorer, generate
from merge_backend.architectures import ARCHITECTURES, block_names
from merge_backend.recipe import Recipe, Source, uniform_ratios
from toyworld.draw import CENTRED, Layout, draw, random_scenes
from toyworld.files import ToyWorld, world_layouts, world_sampling, world_styles
from toyworld.train_clip import through_vae
from toyworld.training import pictures_to_tensor
from toyworld.world import (
    ATTRIBUTES,
    HELD_OUT,
    STYLED,
    STYLES,
    Style,
    all_subjects,
    caption,
    probe_prompts,
    training_subjects,
)

MBW = block_names(ARCHITECTURES["sd1"], "mbw")


def probe_set(world: ToyWorld, prompts: list[str], seeds: list[int],
              batch_size: int = 16) -> ProbeSet:
    """Probes drawn as the world draws them (``files.world_sampling``)."""
    return ProbeSet(prompts=prompts, seeds=seeds, batch_size=batch_size,
                    **world_sampling(world.folder))


def held_out_probes(world: ToyWorld, seeds: int = 8) -> ProbeSet:
    return probe_set(world, [caption(s) for s in HELD_OUT], list(range(1, seeds + 1)))


def load(world: ToyWorld, name: str, device: str = "cpu"):
    from merge_backend.pipeline import load_pipeline

    return load_pipeline(world.checkpoint(name), config_folder=world.config_folder,
                         device=device)


def clip_scorer(world: ToyWorld, kind: str = "clip", device: str = "cpu", **extra):
    return build_scorer({"kind": kind, "model": str(world.clip_config),
                         "weights": str(world.clip_weights), **extra}, device=device)


# ---------------------------------------------------------------------------- naming


def class_embeddings(scorer, attribute: str) -> torch.Tensor:
    """``[classes, D]``: per value of ``attribute``, the normalised mean embedding of every
    plain caption that names it (CLIP's prompt ensembling over this world's template)."""
    rows = []
    for value in ATTRIBUTES[attribute]:
        prompts = [caption(s) for s in all_subjects() if getattr(s, attribute) == value]
        rows.append(F.normalize(scorer.text_embeddings(prompts).mean(dim=0), dim=0))
    return torch.stack(rows)


def name(scorer, images: torch.Tensor, attribute: str) -> list[str]:
    """Zero-shot names of ``attribute`` for each image."""
    logits = scorer.image_embeddings(images) @ class_embeddings(scorer, attribute).T
    return [ATTRIBUTES[attribute][i] for i in logits.argmax(dim=1).tolist()]


# seeds per held-out prompt for the naming figure: 8 prompts x 32 seeds = 256 probes, a standard
# error near 0.02 at 0.9 (with 8 seeds the twelfth pass's world read 0.906, with 16 0.883: RESULTS.md,
# issue 14, fourteenth pass)
NAMING_SEEDS = 32


def naming(world: ToyWorld, seeds: int = NAMING_SEEDS, device: str = "cpu",
           pipe=None) -> dict[str, float]:
    """Share of the base model's held-out probes whose shape / colour / background the CLIP
    scorer names right."""
    pipe = pipe or load(world, "base", device)
    probes = held_out_probes(world, seeds)
    images = generate(pipe, probes).images
    scorer = clip_scorer(world, device=device)
    truth = [HELD_OUT[job.prompt_index] for job in probes.jobs()]
    return {attr: float(np.mean([n == getattr(t, attr) for n, t in
                                 zip(name(scorer, images, attr), truth)]))
            for attr in ATTRIBUTES}


# ---------------------------------------------------------------------------- style


@dataclass
class StyleProbe:
    """Multinomial logistic regression on CLIP image embeddings: plain / a / b."""

    weight: torch.Tensor
    bias: torch.Tensor
    labels: tuple[str, ...] = tuple(STYLES)

    def classify(self, embeddings: torch.Tensor) -> list[str]:
        return [self.labels[i] for i in (embeddings @ self.weight.T + self.bias).argmax(1)]


# which style each model of a world was trained on
MODEL_STYLE = {"base": "plain", "style_a": "a", "style_b": "b"}


def fit_style_probe(scorer, per_style: int = 200, seed: int = 7,
                    layouts: dict[str, Layout] | None = None,
                    styles: dict[str, Style] | None = None, vae=None) -> StyleProbe:
    """Fit on pictures drawn in each style, placed as the model trained on it placed them
    (``layouts``, by model name; centred when not given); ``styles``: the style each model
    was trained on, by model name (``world.STYLED`` when not given); ``vae``: fit on the
    pictures after its encode / decode round trip, as the world's models can draw them at
    best, not as drawn."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    placed = {MODEL_STYLE[m]: layout for m, layout in (layouts or {}).items()}
    drawn = {MODEL_STYLE[m]: style for m, style in (styles or STYLED).items()}
    for label, name in enumerate(STYLES):
        pictures = pictures_to_tensor(draw(random_scenes(rng, per_style, training_subjects(),
                                                         drawn[name], placed.get(name, CENTRED))))
        if vae is not None:
            pictures = through_vae(vae, pictures).float() / 255.0
        xs.append(scorer.image_embeddings(pictures))
        ys += [label] * per_style
    x, y = torch.cat(xs), torch.tensor(ys)
    weight = torch.zeros(len(STYLES), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(STYLES), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return StyleProbe(weight.detach(), bias.detach())


@dataclass
class StyleFigures:
    """What the style probe calls the held-out probes of each model (``calls[model][label]``:
    a share), and the issue's two figures drawn from it: A's probes told from B's, the base's
    called neither."""

    calls: dict[str, dict[str, float]]
    margins: dict[str, float]  # style_a / style_b: share whose own fine-tune label wins

    @property
    def a_vs_b(self) -> float:
        """Share of style_a's and style_b's probes told apart: of the two fine-tunes' labels,
        the probe scores each model's own above the other's."""
        return (self.margins["style_a"] + self.margins["style_b"]) / 2

    @property
    def base_neither(self) -> float:
        """Share of the base's probes the probe calls neither style (plain)."""
        return self.calls["base"]["plain"]

    def own(self, model: str) -> float:
        """Share of ``model``'s probes called its own style among all three."""
        return self.calls[model][MODEL_STYLE[model]]


def style_probe(world: ToyWorld, seeds: int = 4, device: str = "cpu") -> StyleFigures:
    """The probe (fit on plain / A / B pictures, drawn and placed as the world's data sets
    were, after a round trip through the world's VAE) on the held-out probes of base, style_a
    and style_b: what it calls each model's probes, and how often it tells A's from B's."""
    scorer = clip_scorer(world, device=device)
    pipes = {model: load(world, model, device) for model in MODEL_STYLE}
    probe = fit_style_probe(scorer, layouts=world_layouts(world.folder),
                            styles=world_styles(world.folder), vae=pipes["base"].vae)
    probes = held_out_probes(world, seeds)
    calls, margins = {}, {}
    a, b = probe.labels.index("a"), probe.labels.index("b")
    for model, pipe in pipes.items():
        images = generate(pipe, probes).images
        embeddings = scorer.image_embeddings(images)
        named = probe.classify(embeddings)
        calls[model] = {label: float(np.mean([n == label for n in named]))
                        for label in probe.labels}
        if model != "base":
            logits = embeddings @ probe.weight.T + probe.bias
            own, other = (a, b) if model == "style_a" else (b, a)
            margins[model] = float((logits[:, own] > logits[:, other]).float().mean())
    return StyleFigures(calls, margins)


# ---------------------------------------------------------------------------- sensitivity


def merge_recipe(world: ToyWorld, ratios: dict[str, float]) -> Recipe:
    """style_a (model1) x style_b (model2), per MBW block. Ratios may leave [0, 1] a little:
    the sensitivity figures move a hidden merge near the edge by 0.3 either way."""
    return Recipe(arch="sd1", method="weighted_sum", vocabulary="mbw", ratios=dict(ratios),
                  models={"model1": Source(str(world.style_a)),
                          "model2": Source(str(world.style_b))}, arithmetic="fast",
                  allow_extrapolation=True)


def hidden_ratios(seed: int, low: float = 0.3, high: float = 0.7) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {b: round(float(v), 3) for b, v in zip(MBW, rng.uniform(low, high, len(MBW)))}


@dataclass
class Sensitivity:
    hidden: dict[str, float]
    down: dict[str, float]  # reference score change with the block at hidden - step
    up: dict[str, float]  # ... at hidden + step
    score_range: float  # max - min of the reference score over the merges sampled for it

    def share(self, block: str) -> float:
        """The smaller of the two changes, as a share of the observed range."""
        return min(self.down[block], self.up[block]) / self.score_range

    def sensitive(self, threshold: float = 0.01) -> list[str]:
        return [b for b in MBW if self.share(b) >= threshold]

    def table(self) -> list[str]:
        lines = [f"{'block':6s} {'hidden':>6s} {'-0.3':>9s} {'+0.3':>9s} {'min/range':>9s}"]
        lines += [f"{b:6s} {self.hidden[b]:6.3f} {self.down[b]:9.5f} {self.up[b]:9.5f} "
                  f"{self.share(b):9.2%}" for b in MBW]
        return lines


def _hidden_merge_probes(world: ToyWorld, device: str, prompts: list[str] | None):
    """``images(ratios)`` (the demo's probes of style_a x style_b merged per MBW block), the
    paired `reference` scorer and the probes' prompts: what the sensitivity figures score."""
    from merge_backend.engine import MergeEngine

    probes = probe_set(world, prompts or probe_prompts(), [1], batch_size=4)
    pipe = load(world, "style_a", device)
    template = merge_recipe(world, uniform_ratios("sd1", "mbw", 1.0))
    engine = MergeEngine(pipe, template, device=device)
    scorer = clip_scorer(world, "reference", device=device, mode="paired")

    def images(ratios: dict[str, float]) -> torch.Tensor:
        engine.apply(merge_recipe(world, ratios))
        return generate(pipe, probes).images

    return images, scorer, [job.prompt.text for job in probes.jobs()]


def sensitivity(world: ToyWorld, seed: int = 0, step: float = 0.3, random_merges: int = 24,
                device: str = "cpu", prompts: list[str] | None = None) -> Sensitivity:
    """The `reference` score (paired, CLIP image-image cosine to the hidden merge's probes)
    after moving each block by +-``step`` from a random hidden merge. The range is observed
    over the hidden merge, both parents, the uniform 0.5 merge and ``random_merges`` random
    merges."""
    images, scorer, texts = _hidden_merge_probes(world, device, prompts)
    return sensitivity_of(images, scorer, texts, hidden_ratios(seed), seed, step, random_merges)


def identifiability(world: ToyWorld, hidden: dict[str, float], seed: int = 0,
                    device: str = "cpu") -> tuple[Sensitivity, Directions]:
    """The block table and the ``Directions`` of the `reference` score at ``hidden``."""
    images, scorer, texts = _hidden_merge_probes(world, device, None)
    table = sensitivity_of(images, scorer, texts, hidden, seed)

    def embed(ratios: dict[str, float]) -> np.ndarray:
        return scorer.image_embeddings(images(ratios)).numpy()

    def score(ratios: dict[str, float]) -> float:
        return float(scorer.score(images(ratios), texts).mean())

    return table, directions_of(embed, score, hidden, table.score_range)


def sensitivity_of(images, scorer, prompts: list[str], hidden: dict[str, float], seed: int,
                   step: float = 0.3, random_merges: int = 24) -> Sensitivity:
    """The sensitivity table of any merge -> probe images map ``images(ratios)`` (one image per
    prompt of ``prompts``), scored by a paired `reference` ``scorer`` whose references become
    the hidden merge's images."""
    scorer.set_references(images(hidden))

    def score(ratios: dict[str, float]) -> float:
        return float(scorer.score(images(ratios), prompts).mean())

    base = score(hidden)
    rng = np.random.default_rng(seed + 1)
    seen = [base] + [score(uniform_ratios("sd1", "mbw", v)) for v in (1.0, 0.0, 0.5)]
    seen += [score(dict(zip(MBW, rng.uniform(0, 1, len(MBW)).tolist())))
             for _ in range(random_merges)]
    down, up = {}, {}
    for block in MBW:
        for moved, sign in ((down, -1), (up, 1)):
            value = score({**hidden, block: hidden[block] + sign * step})
            moved[block] = abs(base - value)
            seen.append(value)
    return Sensitivity(hidden, down, up, max(seen) - min(seen))


@dataclass
class Directions:
    """The directions in ratio space that the `reference` score sees, at a hidden merge.

    Blocks can each move the score and still not be told apart: when two blocks change the
    pictures the same way, raising one and lowering the other changes nothing. The
    directions are the eigenvectors of the scorer's Gauss-Newton matrix at the hidden merge,
    the mean over the probes of ``J^T J`` with ``J`` the Jacobian of a probe's normalised CLIP
    embedding with respect to the 26 ratios (central differences); ``strength`` are its
    eigenvalues, strongest first. ``down`` / ``up`` are the score changes after moving the
    hidden merge by -/+ ``step`` along each direction (a unit vector: the same length as the
    block table's one-block moves), and the range is the block table's.
    """

    hidden: dict[str, float]
    vectors: np.ndarray  # [26 blocks in MBW order, 26 directions], unit columns
    strength: np.ndarray  # [26], descending
    down: np.ndarray
    up: np.ndarray
    score_range: float

    def shares(self) -> np.ndarray:
        return np.minimum(self.down, self.up) / self.score_range

    def sensitive(self, threshold: float = 0.01) -> list[int]:
        """The directions whose both moves change the score by >= ``threshold`` of the range
        (the block table's rule)."""
        return [k for k, share in enumerate(self.shares()) if share >= threshold]

    def rmse(self, found: dict[str, float], threshold: float = 0.01) -> float:
        """Root mean square of ``found - hidden`` along the sensitive directions."""
        keep = self.sensitive(threshold)
        delta = np.array([found[b] - self.hidden[b] for b in MBW])
        along = self.vectors[:, keep].T @ delta
        return float(np.sqrt(np.mean(along ** 2))) if keep else float("nan")

    def to_json(self) -> dict:
        return {k: v.tolist() if isinstance(v, np.ndarray) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> Directions:
        return cls(**{k: np.array(v) if isinstance(v, list) else v for k, v in data.items()})

    def table(self) -> list[str]:
        lines = [f"{'dir':>3s} {'strength':>9s} {'-0.3':>9s} {'+0.3':>9s} {'min/range':>9s}  "
                 "largest blocks"]
        for k in range(len(self.strength)):
            v = self.vectors[:, k]
            top = np.argsort(-np.abs(v))[:3]
            blocks = " ".join(f"{MBW[i]}{v[i]:+.2f}" for i in top)
            lines.append(f"{k:3d} {self.strength[k] / self.strength[0]:9.2e} "
                         f"{self.down[k]:9.5f} {self.up[k]:9.5f} {self.shares()[k]:9.2%}  "
                         f"{blocks}")
        return lines


def directions_of(embed, score, hidden: dict[str, float], score_range: float,
                  step: float = 0.3, h: float = 0.02) -> Directions:
    """``Directions`` of a merge -> normalised probe embeddings map ``embed(ratios)``
    (``[P, D]``) whose score ``score(ratios)`` compares with the hidden merge's probes."""
    centre = np.array([hidden[b] for b in MBW], dtype=np.float64)

    def at(x: np.ndarray) -> dict[str, float]:
        return dict(zip(MBW, x.tolist()))

    columns = []
    for i in range(len(MBW)):
        e = np.zeros(len(MBW))
        e[i] = h
        plus = np.asarray(embed(at(centre + e)), dtype=np.float64)
        minus = np.asarray(embed(at(centre - e)), dtype=np.float64)
        columns.append((plus - minus) / (2 * h))
    jacobian = np.stack(columns, axis=-1)  # [P, D, 26]
    gauss_newton = np.einsum("pdi,pdj->ij", jacobian, jacobian) / jacobian.shape[0]
    strength, vectors = np.linalg.eigh(gauss_newton)
    strength, vectors = strength[::-1].copy(), vectors[:, ::-1].copy()
    base = score(hidden)
    down, up = np.zeros(len(MBW)), np.zeros(len(MBW))
    for k in range(len(MBW)):
        down[k] = abs(base - score(at(centre - step * vectors[:, k])))
        up[k] = abs(base - score(at(centre + step * vectors[:, k])))
    return Directions(dict(hidden), vectors, strength, down, up, score_range)
