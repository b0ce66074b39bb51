"""The world's diffusion models: a base UNet and text encoder trained on plain pictures, and
fine-tunes of that base on each style, the way diffusers' text-to-image training does it.

Latents come from the world's VAE once (``encode``: the posterior's mean and std, times the
VAE's ``scaling_factor``) and a fresh latent is sampled from them every step; noise is added
by a ``DDPMScheduler`` built from the pipeline's own scheduler config; the loss is the MSE of
the predicted noise (epsilon prediction); 10% of captions are dropped to the empty prompt so
classifier-free guidance works. Fine-tunes keep the base's captions: a style is what the
model draws, not a word it reads.

Example:
    >>> unet, te = train_unet(TrainUNet(steps=10), unet, te, latents, captions, folder)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toyworld.training import (
    Report,
    average_gradients,
    mark_used_rows,
    rank,
    share,
    used_rows_only,
    world_token_ids,
)


@dataclass(frozen=True)
class TrainUNet:
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3
    text_encoder_lr: float = 2e-4  # 0 keeps the text encoder frozen
    caption_dropout: float = 0.1
    snr_gamma: float | None = 5.0  # min-SNR loss weighting (diffusers' --snr_gamma); None: off
    warmup: float = 0.05
    seed: int = 4


@dataclass(frozen=True)
class Latents:
    """Posterior mean and std of every training picture (already times scaling_factor) and
    the caption of each."""

    mean: torch.Tensor
    std: torch.Tensor
    captions: list[str]


# batches of 40 encode a picture in a third of the time that batches of 256 take, to the same
# bits on the shipped plan's three sets (one CPU thread; RESULTS.md, issue 14, seventeenth pass)
@torch.no_grad()
def encode(vae, pictures: torch.Tensor, captions: list[str], batch: int = 40) -> Latents:
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(pictures), batch):
        posterior = vae.encode(pictures[i:i + batch].to(device) * 2 - 1).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    factor = vae.config.scaling_factor
    return Latents(torch.cat(means) * factor, torch.cat(stds) * factor, list(captions))


def mask_unused_tokens(text_encoder) -> None:
    """Zero every token embedding the world never uses; ``train_unet`` keeps them at zero."""
    mark_used_rows(text_encoder.get_input_embeddings(), world_token_ids())


def noise_scheduler(config_folder: Path):
    from diffusers import DDPMScheduler

    config = json.loads((Path(config_folder) / "scheduler" / "scheduler_config.json").read_text())
    return DDPMScheduler.from_config(config)


def loss_weights(scheduler, snr_gamma: float | None) -> torch.Tensor:
    """Per-timestep loss weights: min(SNR, gamma) / SNR for epsilon prediction (Hang et al.
    2023, as diffusers' training scripts compute it), or ones."""
    alphas = scheduler.alphas_cumprod.float()
    if snr_gamma is None:
        return torch.ones_like(alphas)
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=snr_gamma) / snr


def tokenize(config_folder: Path, captions: list[str]) -> torch.Tensor:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(Path(config_folder) / "tokenizer")
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(plan: TrainUNet, unet, text_encoder, data: Latents, config_folder: Path,
               report: Report | None = None):
    """Train ``unet`` (and the text encoder unless its lr is 0) in place, on the UNet's
    device; returns both. Random draws happen on the CPU."""
    device = next(unet.parameters()).device
    scheduler = noise_scheduler(config_folder)
    distinct = sorted(set(data.captions) | {""})
    index = {c: i for i, c in enumerate(distinct)}
    tokens = tokenize(config_folder, distinct).to(device)
    caption_ids = torch.tensor([index[c] for c in data.captions])
    with used_rows_only(text_encoder):
        _steps(plan, unet, text_encoder, data, scheduler, tokens, caption_ids, index[""],
               report)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


def _steps(plan: TrainUNet, unet, text_encoder, data: Latents, scheduler, tokens: torch.Tensor,
           caption_ids: torch.Tensor, empty: int, report: Report | None) -> None:
    device = next(unet.parameters()).device
    train_te = plan.text_encoder_lr > 0
    unet.train()
    text_encoder.train(train_te).requires_grad_(train_te)
    groups = [{"params": list(unet.parameters()), "lr": plan.lr}]
    if train_te:
        groups.append({"params": list(text_encoder.parameters()), "lr": plan.text_encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2, fused=True)  # 24 -> 5 ms a UNet step
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [g["lr"] for g in groups],
                                                total_steps=plan.steps, pct_start=plan.warmup)
    weights = loss_weights(scheduler, plan.snr_gamma).to(device)
    # each process draws its own share of every batch from its own stream
    gen = torch.Generator().manual_seed(plan.seed * 100 + rank())
    rng = np.random.default_rng(plan.seed * 100 + rank())
    batch = share(plan.batch)
    params = [p for g in groups for p in g["params"]]
    for step in range(plan.steps):
        pick = torch.randint(0, len(data.mean), (batch,), generator=gen)
        eps = torch.randn(data.mean[pick].shape, generator=gen)
        latents = (data.mean[pick] + data.std[pick] * eps).to(device)
        ids = caption_ids[pick].clone()
        ids[torch.from_numpy(rng.random(batch) < plan.caption_dropout)] = empty
        used, inverse = torch.unique(ids, return_inverse=True)
        with torch.set_grad_enabled(train_te):
            hidden = text_encoder(tokens[used.to(device)])[0][inverse.to(device)]
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, t.to(device))
        t = t.to(device)
        error = F.mse_loss(unet(noisy, t, hidden).sample, noise, reduction="none")
        loss = (error.mean(dim=(1, 2, 3)) * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        opt.step()
        sched.step()
        if report and rank() == 0:
            report(step + 1, plan.steps, f"loss {loss.item():.4f}")
