"""The world's VAE: diffusers' AutoencoderKL (the tiny SD1 config) trained to reconstruct.

Loss as in the original latent-diffusion autoencoder minus its GAN: pixel error plus a tiny
KL term. Afterwards the latent space is rescaled in place (``standardise_latents``) so that
the SD1 ``scaling_factor`` (0.18215) every SD1 loader assumes gives unit-variance latents.

Example:
    >>> vae = train_vae(TrainVAE(steps=10), config_folder)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toyworld.draw import CENTRED, Layout, draw, random_scenes
from toyworld.training import (
    Report,
    average_gradients,
    build,
    pictures_to_tensor,
    quiet,
    rank,
    share,
)
from toyworld.world import random_style, training_subjects


@dataclass(frozen=True)
class TrainVAE:
    steps: int = 1500
    batch: int = 16
    lr: float = 2e-3
    kl_weight: float = 1e-6
    pictures: int = 12000
    initial_std: float = 0.02
    chroma_weight: float = 3.0
    crop: int = 64  # train on random crops this big (the VAE is convolutional)
    layout: Layout = CENTRED  # where its pictures' shapes go
    looks: float = 0.0  # the share of its pictures with random whole-picture looks (world.LOOKS)
    seed: int = 1


def train_vae(plan: TrainVAE, config_folder: Path, report: Report | None = None,
              device: str | torch.device = "cpu"):
    """A trained AutoencoderKL (on ``device``) whose latents have std 1 / scaling_factor.

    Random draws happen on the CPU, so a GPU run sees the same batches as a CPU run.
    """
    quiet()
    rng = np.random.default_rng(plan.seed)
    data = pictures_to_tensor(draw(random_scenes(rng, plan.pictures, training_subjects(),
                                                 partial(random_style, looks=plan.looks),
                                                 plan.layout)))
    torch.manual_seed(plan.seed)
    vae = build("vae", config_folder).to(device).train()
    with torch.no_grad():
        # start with a nearly deterministic posterior (std 0.02): with the default std 1 the
        # decoder first sees mostly noise and learns colour only after many more steps
        vae.quant_conv.bias[vae.config.latent_channels:] = 2 * math.log(plan.initial_std)
    opt = torch.optim.AdamW(vae.parameters(), lr=plan.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, plan.lr, total_steps=plan.steps,
                                                pct_start=0.05)
    # each process draws its own share of every batch from its own stream
    gen = torch.Generator().manual_seed(plan.seed * 100 + rank())
    batch = share(plan.batch)
    for step in range(plan.steps):
        x = data[torch.randint(0, len(data), (batch,), generator=gen)].to(device) * 2 - 1
        if plan.crop < x.shape[-1]:
            top, left = (int(v) for v in torch.randint(0, x.shape[-1] - plan.crop + 1, (2,),
                                                        generator=gen) // 8 * 8)
            x = x[..., top:top + plan.crop, left:left + plan.crop]
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(device)
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        # chroma (each pixel minus its grey level) carries less of the pictures' variance
        # than brightness and is learned last; weighting it up gets colours right sooner
        chroma = F.mse_loss(recon - recon.mean(1, keepdim=True), x - x.mean(1, keepdim=True))
        loss = mse + plan.chroma_weight * chroma + plan.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(vae.parameters())
        opt.step()
        sched.step()
        if report and rank() == 0:
            report(step + 1, plan.steps, f"psnr {psnr(mse.item()):.1f} dB")
    vae.eval().requires_grad_(False)
    standardise_latents(vae, data[:1024].to(device))
    return vae


def psnr(mse_pm1: float) -> float:
    """PSNR of images in [0, 1] from the MSE measured in [-1, 1]."""
    return 10 * math.log10(4.0 / max(mse_pm1, 1e-12))


@torch.no_grad()
def standardise_latents(vae, sample: torch.Tensor) -> float:
    """Scale the latent space so ``scaling_factor * latents`` has std 1; returns the factor.

    ``quant_conv`` makes the posterior's (mean, logvar) and ``post_quant_conv`` reads a latent:
    scaling the mean rows by c, shifting logvar by 2 ln c and dividing the decoder's input
    weights by c changes no decoded picture.
    """
    means = torch.cat([vae.encode(sample[i:i + 128] * 2 - 1).latent_dist.mean
                       for i in range(0, len(sample), 128)])
    c = 1.0 / (float(means.std()) * vae.config.scaling_factor)
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= c
    vae.quant_conv.bias[:channels] *= c
    vae.quant_conv.bias[channels:] += 2 * math.log(c)
    vae.post_quant_conv.weight *= 1.0 / c
    return c
