"""The build's stages, each a function of the plan and the files earlier stages wrote.

A stage reads its inputs from the work folder and writes its output there atomically, so the
two build workers can run stages side by side and wait on each other's files. Every stage is
seeded from the plan alone: which worker runs it, and when, changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from merge_backend.atomic_files import atomic_path
from toyworld.draw import CENTRED, Layout, draw, random_scenes
from toyworld.train_clip import (
    TrainCLIP,
    TrainHead,
    create_clip,
    house_pictures,
    train_clip,
    train_house_head,
    tune_clip,
    tune_pictures,
)
from toyworld.train_diffusion import Latents, TrainUNet, encode, mask_unused_tokens, train_unet
from toyworld.train_vae import TrainVAE, train_vae
from toyworld.training import Report, build, pictures_to_tensor, rank
from toyworld.world import (
    PLAIN,
    SAMPLING,
    STYLE_A_LOOKS,
    STYLE_B_LOOKS,
    STYLED,
    Style,
    caption,
    training_subjects,
)


@dataclass(frozen=True)
class BuildPlan:
    """Every number the build uses. ``seed`` offsets every stage's own seed. ``size`` names
    the SD1 config folder the family is built in (``merge_backend/architectures/sd1.yaml``);
    ``layouts`` says where each diffusion data set's shapes go; ``sampling`` how the world's
    probes are drawn (its study config, the demo, the acceptance figures); ``styles`` the
    style each diffusion data set is drawn in."""

    seed: int = 0
    size: str = "tiny"
    vae: TrainVAE = TrainVAE()
    clip: TrainCLIP = TrainCLIP()
    head: TrainHead = TrainHead()
    base: TrainUNet = TrainUNet()
    finetune: TrainUNet = TrainUNet(steps=600, batch=32, lr=3e-4, text_encoder_lr=5e-5,
                                    warmup=0.1, seed=5)
    pictures: dict[str, int] = field(default_factory=lambda: {"base": 16000, "style_a": 6000,
                                                              "style_b": 6000})
    layouts: dict[str, Layout] = field(default_factory=lambda: dict.fromkeys(STYLED, CENTRED))
    sampling: dict[str, Any] = field(default_factory=lambda: dict(SAMPLING))
    styles: dict[str, Style] = field(default_factory=lambda: dict(STYLED))

    def seeded(self, stage_seed: int) -> int:
        return self.seed * 1000 + stage_seed


# The layout world (RESULTS.md, issue 14's eighth pass): a 16x16 latent, the base trained on
# shapes spread over the whole picture, style A drawing them up-left and large, B down-right and
# small, and the VAE and scorers trained on pictures that cover every one of those places.
SPREAD = Layout(spread=12.0, radius=(11.0, 19.0))
LAYOUT_A = Layout(centre=(23.0, 23.0), spread=4.0, radius=(17.0, 19.0))
LAYOUT_B = Layout(centre=(41.0, 41.0), spread=4.0, radius=(11.0, 13.0))
EVERYWHERE = Layout(spread=14.0, radius=(11.0, 21.0))

LAYOUT16 = BuildPlan(size="toy16", vae=TrainVAE(layout=EVERYWHERE),
                     clip=TrainCLIP(layout=EVERYWHERE), head=TrainHead(layout=EVERYWHERE),
                     base=TrainUNet(steps=3000),
                     layouts={"base": SPREAD, "style_a": LAYOUT_A, "style_b": LAYOUT_B})

# The shipped world (toyworld/weights; RESULTS.md, issue 14, twelfth, fifteenth and sixteenth
# passes): the layout world in the `lo` UNet (attention at 8x8, 4x4 and in the middle block), its
# styles with opposite whole-picture looks on top, which the VAE sees on every picture and the
# CLIP and the house head on half of theirs; a shorter VAE, longer fine-tunes and a house head
# on fewer pictures than the other layout worlds (fine-tunes of 1000 steps, not the twelfth
# pass's 1200, and 4000 head pictures, not 6000: the rebuild's time near 30 minutes, fifteenth
# pass). The fine-tunes learn at the base's rates (lr 1e-3, text encoder 2e-4, not 3e-4 and
# 5e-5): with the looks at twice their strength, a merge of them moves 18-19 blocks, not 10-16
# (sixteenth pass; a 2600-step base, for time, moved 14-18 and drew less cleanly).
SHIPPED_PLAN = replace(
    LAYOUT16, size="toy16_lo", vae=replace(LAYOUT16.vae, steps=900, looks=1.0),
    clip=replace(LAYOUT16.clip, looks=0.5), head=replace(LAYOUT16.head, looks=0.5, pictures=4000),
    finetune=replace(BuildPlan.finetune, steps=1000, lr=1e-3, text_encoder_lr=2e-4),
    styles={"base": PLAIN, "style_a": STYLE_A_LOOKS, "style_b": STYLE_B_LOOKS})

# name -> plan (`mergesearch toyworld build DIR --plan NAME`); "shipped" built toyworld/weights,
# "first" the world shipped before it (8x8 latents, centred shapes, styles without looks); the
# layout worlds' figures are in RESULTS.md (issue 14, ninth to twelfth passes)
LAYOUT16_WIDE = replace(LAYOUT16, size="toy16_wide")  # cleaner pictures, slower
PLANS = {
    "shipped": SHIPPED_PLAN,
    "first": BuildPlan(),
    "layout16": LAYOUT16,
    "layout16_wide": LAYOUT16_WIDE,
    # a CLIP that also learned where the shape is and how big
    "layout16_wide_words": replace(LAYOUT16_WIDE, clip=replace(LAYOUT16_WIDE.clip,
                                                               layout_words=True)),
    # 64 channels at the 4x4 and 2x2 levels: clean pictures, black backgrounds, few blocks
    "layout16_deep": replace(LAYOUT16, size="toy16_deep"),
    # less attention (RESULTS.md, issue 14, eleventh pass): none at the 16x16 level ("lo": the
    # cleanest pictures, 3 blocks), only at 4x4 and in the middle block, only in the middle block
    "layout16_lo": replace(LAYOUT16, size="toy16_lo"),
    "layout16_4x4": replace(LAYOUT16, size="toy16_4x4"),
    "layout16_mid": replace(LAYOUT16, size="toy16_mid"),
}


@dataclass
class Work:
    """The work folder of one build, the config folder and the device stages run on."""

    folder: Path
    config_folder: Path
    clip_config: Path
    device: torch.device = torch.device("cpu")
    failed: Callable[[], bool] | None = None  # set in each worker: did the other one fail?

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def save(self, name: str, obj) -> None:
        with atomic_path(self.path(name)) as tmp:
            torch.save(obj, tmp)

    def claim(self, name: str) -> bool:
        """Whether this worker is the first to ask for stage ``name`` (and so runs it)."""
        try:
            (self.folder / f"{name}.claimed").open("x").close()
        except FileExistsError:
            return False
        return True

    def load(self, name: str, timeout: float = 7200.0):
        """Wait for another worker's output (or its failure), then load it."""
        start = time.monotonic()
        while not self.path(name).exists():
            if self.failed is not None and self.failed():
                raise RuntimeError(f"stage output {name} will not come: the other worker failed")
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"waited {timeout:.0f} s for stage output {name}")
            time.sleep(0.5)
        return torch.load(self.path(name), map_location="cpu", weights_only=True)


def _seeded(plan: BuildPlan, part):
    """A part of the plan (``plan.vae``, ``plan.clip``, ...) with its seed offset by the plan's."""
    return replace(part, seed=plan.seeded(part.seed))


def _vae(work: Work):
    vae = build("vae", work.config_folder)
    vae.load_state_dict(work.load("vae"))
    return vae.to(work.device).eval().requires_grad_(False)


def stage_vae(plan: BuildPlan, work: Work, report: Report) -> None:
    vae = train_vae(_seeded(plan, plan.vae), work.config_folder, report, work.device)
    work.save("vae", _cpu(vae))


def stage_latents(name: str) -> Callable[[BuildPlan, Work, Report], None]:
    """The stage that draws the pictures of diffusion data set ``name`` (base, style_a,
    style_b) and encodes them: one stage a set, so that the two workers can share them."""
    def run(plan: BuildPlan, work: Work, report: Report) -> None:
        rng = np.random.default_rng(plan.seeded(10 + list(STYLED).index(name)))
        scenes = random_scenes(rng, plan.pictures[name], training_subjects(), plan.styles[name],
                               plan.layouts[name])
        pictures = pictures_to_tensor(draw(scenes))
        latents = encode(_vae(work), pictures, [caption(s) for s in scenes.subjects])
        work.save(f"latents_{name}", {"mean": latents.mean, "std": latents.std,
                                      "captions": latents.captions})
        report(1, 1, "")

    run.__name__ = f"stage_latents_{name}"
    return run


def _latents(work: Work, name: str) -> Latents:
    data = work.load(f"latents_{name}")
    return Latents(data["mean"], data["std"], data["captions"])


def stage_base(plan: BuildPlan, work: Work, report: Report) -> None:
    """Data parallel over the build's processes: each takes its share of every batch."""
    torch.manual_seed(plan.seeded(20))
    unet = build("unet", work.config_folder)
    text_encoder = build("te", work.config_folder)
    mask_unused_tokens(text_encoder)
    unet, text_encoder = train_unet(_seeded(plan, plan.base),
                                    unet.to(work.device), text_encoder.to(work.device),
                                    _latents(work, "base"), work.config_folder, report)
    if rank() == 0:
        work.save("base", {"unet": _cpu(unet), "te": _cpu(text_encoder)})


def stage_finetune(style: str) -> Callable[[BuildPlan, Work, Report], None]:
    def run(plan: BuildPlan, work: Work, report: Report) -> None:
        base = work.load("base")
        unet = build("unet", work.config_folder)
        text_encoder = build("te", work.config_folder)
        unet.load_state_dict(base["unet"])
        text_encoder.load_state_dict(base["te"])
        mask_unused_tokens(text_encoder)
        seed = plan.seeded(plan.finetune.seed + list(STYLED).index(style))
        unet, text_encoder = train_unet(replace(plan.finetune, seed=seed),
                                        unet.to(work.device), text_encoder.to(work.device),
                                        _latents(work, style), work.config_folder, report)
        work.save(style, {"unet": _cpu(unet), "te": _cpu(text_encoder)})

    run.__name__ = f"stage_{style}"
    return run


def stage_clip(plan: BuildPlan, work: Work, report: Report) -> None:
    model = train_clip(_seeded(plan, plan.clip), work.clip_config, report, work.device)
    work.save("clip_drawn", _cpu(model))


def _clip(plan: BuildPlan, work: Work, name: str):
    model, tokenizer = create_clip(work.clip_config, 0, plan.clip.layout_words, plan.clip.looks)
    model.load_state_dict(work.load(name))
    return model.to(work.device), tokenizer


def stage_tune_pictures(plan: BuildPlan, work: Work, report: Report) -> None:
    data = tune_pictures(_seeded(plan, plan.clip), _vae(work))
    work.save("tune_pictures", data)
    report(1, 1, "")


def stage_clip_tune(plan: BuildPlan, work: Work, report: Report) -> None:
    model, tokenizer = _clip(plan, work, "clip_drawn")
    model = tune_clip(_seeded(plan, plan.clip), model, tokenizer,
                      work.load("tune_pictures"), report)
    work.save("clip", _cpu(model))


def stage_head_pictures(plan: BuildPlan, work: Work, report: Report) -> None:
    work.save("head_pictures", house_pictures(_seeded(plan, plan.head), _vae(work)))
    report(1, 1, "")


def stage_head(plan: BuildPlan, work: Work, report: Report) -> None:
    model, _ = _clip(plan, work, "clip")
    head = train_house_head(_seeded(plan, plan.head), model.eval(), work.load("head_pictures"),
                            report)
    work.save("head", _cpu(head))


def _cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
