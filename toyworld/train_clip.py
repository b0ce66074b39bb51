"""The world's scorers: a tiny open_clip model trained contrastively on captioned pictures, and
a LAION-format aesthetic head trained on its image embeddings to score the house style.

The CLIP reads shape, colour, background and style words (``world.styled_caption``), so the
`clip` scorer measures prompt alignment and the `reference` scorer picture similarity in this
world. It is trained on drawn pictures first, then tuned on the same kind of pictures passed
through the world's VAE (``tune_clip``): what it will score are decoded pictures. Token
embedding rows of words the world never uses stay zero (and compress to nothing).

The scorers see every subject of the world, the held-out combinations included: they are the
judges (as a real CLIP has seen the whole web), and only the diffusion family must never see
``world.HELD_OUT``. A CLIP trained on the 40 training combinations alone learns shortcuts
(on the first full build: shape named right on 99% of training-combination pictures after a
VAE round trip but on 82% of held-out ones, colour and background cueing the shape), and then
the naming figure measures the judge, not the model that drew.

Example:
    >>> model = train_clip(TrainCLIP(steps=10), config_json)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from evaluators._aesthetic_head import AestheticHead
from merge_backend.atomic_files import atomic_write_text
from toyworld.draw import CENTRED, Layout, Scenes, draw, random_scenes
from toyworld.training import Report, mark_used_rows, used_rows_only, world_token_ids
from toyworld.world import (
    ATTRIBUTES,
    all_subjects,
    caption,
    house_score,
    layout_words,
    random_style,
    styled_caption,
)

# vision: 16 px patches (4x4 tokens: a third of the cost of 8 px ones on a CPU); text: the
# captions need < 32 tokens
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 96, "patch_size": 16, "head_width": 48},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class TrainCLIP:
    steps: int = 2500
    batch: int = 128
    lr: float = 2e-3
    pictures: int = 30000
    noise: float = 0.03  # pixel noise std: generated pictures are never quite clean
    tune_steps: int = 400  # then on pictures as drawn and through the VAE
    tune_lr: float = 1e-4
    tune_pictures: int = 8000
    layout: Layout = CENTRED  # where its pictures' shapes go
    # every other caption also says where the shape is and how big (``world.layout_words``),
    # so that the embeddings, and the `reference` score, see a change of layout
    layout_words: bool = False
    # the share of its pictures with random whole-picture looks (world.LOOKS), named in the
    # captions (> 0: the looks' words are learned)
    looks: float = 0.0
    seed: int = 2


@dataclass(frozen=True)
class TrainHead:
    steps: int = 600
    batch: int = 256
    lr: float = 1e-3
    pictures: int = 6000
    layout: Layout = CENTRED
    looks: float = 0.0  # as TrainCLIP.looks (the house score ignores them)
    seed: int = 3


def write_clip_config(path: Path) -> Path:
    atomic_write_text(path, json.dumps(CLIP_CONFIG, indent=2) + "\n")
    return path


def create_clip(config_json: Path, seed: int, layout_words: bool = False, looks: float = 0.0):
    """A fresh open_clip model of ``config_json`` (registered by its file stem) whose unused
    token embedding rows are zero and stay zero (``layout_words``, ``looks``: the layout
    words, the looks' words are used), and its tokenizer."""
    import logging

    import open_clip

    logging.getLogger("root").setLevel(logging.ERROR)  # "no pretrained weights": on purpose
    open_clip.add_model_config(config_json)
    torch.manual_seed(seed)
    model = open_clip.create_model(config_json.stem, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config_json.stem)
    mark_used_rows(model.token_embedding, world_token_ids(layout_words, looks > 0))
    return model, tokenizer


def captioned(scenes: Scenes, layout: bool = False) -> list[str]:
    """Each picture's caption with its style words (``layout``: every other one with its
    layout words as well)."""
    captions = [styled_caption(s, st) for s, st in zip(scenes.subjects, scenes.styles)]
    if layout:
        for i in range(0, len(captions), 2):
            words = layout_words(*scenes.centre[i], scenes.radius[i])
            captions[i] += f", {words}"
    return captions


def attribute_labels(scenes: Scenes) -> torch.Tensor:
    """``[N, 3]``: each picture's shape, colour and background as indices."""
    return torch.tensor([[values.index(getattr(s, a)) for a, values in ATTRIBUTES.items()]
                         for s in scenes.subjects])


def class_embeddings(text: torch.Tensor, members: list[torch.Tensor]) -> torch.Tensor:
    """Per class, the normalised mean of the (normalised) embeddings of the plain captions
    that name it (CLIP's prompt ensembling): the text side of zero-shot naming."""
    return torch.stack([F.normalize(text[m].mean(0), dim=0) for m in members])


def train_clip(plan: TrainCLIP, config_json: Path, report: Report | None = None,
               device: str | torch.device = "cpu"):
    """A CLIP model trained on drawn pictures (train mode, fp32, on ``device``)."""
    rng = np.random.default_rng(plan.seed)
    scenes = random_scenes(rng, plan.pictures, all_subjects(),
                           partial(random_style, looks=plan.looks), plan.layout)
    pictures = torch.from_numpy(draw(scenes)).permute(0, 3, 1, 2)  # uint8: a quarter the memory
    model, tokenizer = create_clip(config_json, plan.seed, plan.layout_words, plan.looks)
    contrastive(model.to(device), tokenizer, pictures, captioned(scenes, plan.layout_words),
                attribute_labels(scenes), plan.steps, plan.lr, plan.batch, plan.noise, plan.seed,
                report)
    return model


def tune_pictures(plan: TrainCLIP, vae) -> dict:
    """What ``tune_clip`` trains on: pictures both as drawn and after an encode / decode round
    trip through ``vae`` (the pictures the world's pipelines draw), with their captions and
    attribute labels. Apart from the tuning, so that the build runs the round trips on the
    worker that trained the VAE while the other one still trains the CLIP."""
    rng = np.random.default_rng(plan.seed + 1)
    scenes = random_scenes(rng, plan.tune_pictures, all_subjects(),
                           partial(random_style, looks=plan.looks), plan.layout)
    drawn = torch.from_numpy(draw(scenes)).permute(0, 3, 1, 2)
    return {"pictures": torch.cat([drawn, through_vae(vae, drawn.float() / 255.0)]),
            "captions": captioned(scenes, plan.layout_words) * 2,
            "labels": attribute_labels(scenes).repeat(2, 1)}


def tune_clip(plan: TrainCLIP, model, tokenizer, data: dict, report: Report | None = None):
    """Continue training, at a lower learning rate, on ``tune_pictures``: half of each batch,
    on average, as drawn and half through the VAE."""
    contrastive(model, tokenizer, data["pictures"], data["captions"], data["labels"],
                plan.tune_steps, plan.tune_lr, plan.batch, plan.noise, plan.seed + 1, report)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def through_vae(vae, pictures: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` pictures after an encode / decode round trip (posterior mean) of
    pictures in [0, 1]. Batches of 64 take half the time of 128 and give the same bits on the
    shipped plan's sets; 40, 50, 80 and 100 do not (one CPU thread; RESULTS.md, issue 14,
    seventeenth pass)."""
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(pictures), batch):
        x = pictures[i:i + batch].to(device) * 2 - 1
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


def contrastive(model, tokenizer, pictures: torch.Tensor, captions: list[str],
                labels: torch.Tensor, steps: int, lr: float, batch: int, noise: float, seed: int,
                report: Report | None = None) -> None:
    """CLIP's symmetric InfoNCE loss (pictures of a batch that share a caption are all
    positives of it), plus the same loss against the class embeddings of each attribute:
    the captions that differ from a picture's only in its shape (or colour, or background)
    are the hard negatives a random batch rarely holds. ``pictures`` is uint8
    ``[N, 3, H, W]``; ``labels`` ``[N, 3]`` from ``attribute_labels``."""
    device = next(model.parameters()).device
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    tokens = tokenizer(distinct).to(device)
    caption_ids = torch.tensor([index[c] for c in captions])
    plain = all_subjects()
    plain_tokens = tokenizer([caption(s) for s in plain]).to(device)
    members = {a: [torch.tensor([i for i, s in enumerate(plain) if getattr(s, a) == v])
                   for v in values] for a, values in ATTRIBUTES.items()}
    model.train()
    with used_rows_only(model):
        _steps(model, pictures, tokens, caption_ids, plain_tokens, members, labels, steps, lr,
               batch, noise, seed, report)


def _steps(model, pictures: torch.Tensor, tokens: torch.Tensor, caption_ids: torch.Tensor,
           plain_tokens: torch.Tensor, members: dict, labels: torch.Tensor, steps: int,
           lr: float, batch: int, noise: float, seed: int, report: Report | None) -> None:
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        pick = torch.randint(0, len(pictures), (batch,), generator=gen)
        x = pictures[pick].float() / 255.0
        x = (x + noise * torch.randn(x.shape, generator=gen)).clamp(0, 1).to(device)
        ids = caption_ids[pick].to(device)
        image = F.normalize(model.encode_image(normalise(model, x)), dim=-1)
        used, inverse = torch.unique(ids, return_inverse=True)
        text = F.normalize(model.encode_text(tokens[used]), dim=-1)[inverse]
        logits = model.logit_scale.exp() * image @ text.T
        same = (ids[:, None] == ids[None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        truth = labels[pick].to(device)
        plain_text = F.normalize(model.encode_text(plain_tokens), dim=-1)
        for column, attribute in enumerate(ATTRIBUTES):
            classes = class_embeddings(plain_text, members[attribute])
            logits = model.logit_scale.exp() * image @ classes.T
            loss = loss + F.cross_entropy(logits, truth[:, column]) / len(ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: a temperature of 1/100
        if report:
            report(step + 1, steps, f"loss {loss.item():.3f}")


def normalise(model, pictures: torch.Tensor) -> torch.Tensor:
    cfg = model.visual.preprocess_cfg
    mean = torch.tensor(cfg["mean"], device=pictures.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], device=pictures.device).view(1, 3, 1, 1)
    return (pictures - mean) / std


@torch.no_grad()
def embed_pictures(model, pictures: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings of ``[N, 3, H, W]`` pictures in [0, 1] (no resizing: the
    world's pictures are the model's input size)."""
    device = next(model.parameters()).device
    out = [model.encode_image(normalise(model, pictures[i:i + batch].to(device)))
           for i in range(0, len(pictures), batch)]
    return F.normalize(torch.cat(out), dim=-1).cpu()


def house_pictures(plan: TrainHead, vae=None) -> dict:
    """What ``train_house_head`` learns from: pictures of random style strengths (uint8
    ``[N, 3, H, W]``, through ``vae`` when given) and their ``world.house_score``. Apart from
    the training, so that the build runs the round trips while the CLIP it needs is still
    being tuned."""
    rng = np.random.default_rng(plan.seed)
    scenes = random_scenes(rng, plan.pictures, all_subjects(),
                           lambda r: random_style(r, continuous=0.6, looks=plan.looks),
                           plan.layout)
    pictures = torch.from_numpy(draw(scenes)).permute(0, 3, 1, 2)
    if vae is not None:
        pictures = through_vae(vae, pictures.float() / 255.0)
    return {"pictures": pictures,
            "targets": torch.tensor([house_score(s) for s in scenes.styles], dtype=torch.float32)}


def train_house_head(plan: TrainHead, clip_model, data: dict,
                     report: Report | None = None) -> AestheticHead:
    """A LAION-format head (affine in the embedding) regressing the house score on
    ``house_pictures``' embeddings."""
    embeddings = embed_pictures(clip_model, data["pictures"].float() / 255.0)
    target = data["targets"]
    torch.manual_seed(plan.seed)
    head = AestheticHead(embeddings.shape[1]).train()
    opt = torch.optim.AdamW(head.parameters(), lr=plan.lr, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(plan.seed)
    for step in range(plan.steps):
        pick = torch.randint(0, len(embeddings), (plan.batch,), generator=gen)
        loss = F.mse_loss(head(embeddings[pick]).squeeze(-1), target[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if report:
            report(step + 1, plan.steps, f"mse {loss.item():.4f}")
    return head.eval().requires_grad_(False)
