"""Pictures a trial leaves behind: its labelled probe grid (PNG) and its ratio chart (SVG).

The grid has one row per prompt and one column per seed, each labelled, so a person can tell
what every image was asked to show. Both pictures are stored as the trial's artifacts in a
fixed order, the probe grid first: optuna-dashboard lists a trial's artifacts by their id, and
its galleries show the first, so every gallery shows probe grids only.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict

import optuna
import torch
from optuna.artifacts import ArtifactMeta
from PIL import Image, ImageDraw, ImageFont

from evaluators import ProbeImages

from .storage_writes import TrialWrites

# optuna.artifacts.upload_artifact records an artifact as this trial system attribute (the key
# optuna-dashboard and optuna.artifacts.get_all_artifact_meta read)
_ARTIFACT_ATTR = "artifacts:"
MIN_CELL, MAX_CELL = 128, 512  # small probes are enlarged (nearest), huge ones shrunk
_LABEL_W, _HEADER_H, _FONT = 190, 24, 13


def _font(size: int = _FONT) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, lines: int) -> list[str]:
    out, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width or not line:
            line = trial
        else:
            out.append(line)
            line = word
    out.append(line)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: max(1, len(out[-1]) - 1)] + "…"
    return out


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (torch.nan_to_num(image.detach().float().cpu(), nan=0.0).clamp(0, 1) * 255)
    return Image.fromarray(array.round().to(torch.uint8).permute(1, 2, 0).numpy())


def _cell(h: int, w: int) -> tuple[int, int]:
    """A grid cell's (width, height): small probes enlarged by a whole factor, huge ones shrunk."""
    side = max(h, w)
    if side < MIN_CELL:
        factor = MIN_CELL // side
        return w * factor, h * factor
    if side > MAX_CELL:
        return max(1, round(w * MAX_CELL / side)), max(1, round(h * MAX_CELL / side))
    return w, h


def labelled_grid(images: ProbeImages, title: str = "") -> Image.Image:
    """Every probe image in a grid: one row per prompt (its text on the left), one column per
    seed (``seed N`` above), ``title`` in the top-left corner."""
    prompts = list(dict.fromkeys(zip(images.prompt_index, images.prompts)))
    row_of = {index: r for r, (index, _) in enumerate(prompts)}
    seeds = list(dict.fromkeys(images.seeds))
    cell_w, cell_h = _cell(*images.images.shape[-2:])
    font = _font()
    canvas = Image.new("RGB", (_LABEL_W + cell_w * len(seeds), _HEADER_H + cell_h * len(prompts)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 5), _wrap(title, font, _LABEL_W - 12, 1)[0], fill="black", font=font)
    for c, seed in enumerate(seeds):
        draw.text((_LABEL_W + c * cell_w + 6, 5), f"seed {seed}", fill="black", font=font)
    lines = max(1, (cell_h - 8) // (_FONT + 3))
    for r, (_, prompt) in enumerate(prompts):
        for i, line in enumerate(_wrap(prompt, font, _LABEL_W - 12, lines)):
            draw.text((6, _HEADER_H + r * cell_h + 4 + i * (_FONT + 3)), line, fill="black",
                      font=font)
    for image, index, seed in zip(images.images, images.prompt_index, images.seeds):
        r, c = row_of[index], seeds.index(seed)
        tile = _to_pil(image)
        if tile.size != (cell_w, cell_h):
            resample = Image.NEAREST if cell_w >= tile.width else Image.LANCZOS
            tile = tile.resize((cell_w, cell_h), resample)
        canvas.paste(tile, (_LABEL_W + c * cell_w, _HEADER_H + r * cell_h))
    return canvas


def labelled_grid_png(images: ProbeImages, title: str = "") -> bytes:
    """``labelled_grid`` as PNG bytes."""
    buf = io.BytesIO()
    labelled_grid(images, title).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def upload_pictures(trial: optuna.Trial, store, pictures: Sequence[tuple[str, str, bytes, str]],
                    writes: TrialWrites | None = None) -> dict[str, str]:
    """Store ``pictures`` (attr, file name, bytes, mimetype) as ``trial``'s artifacts, in this
    order, and each artifact id as the user attribute ``attr``. The ids share one random hex stem
    and end in their position (``…-1``, ``…-2``; the dashboard's artifact route takes hex digits
    and dashes only), so every storage lists them in this order. The records go into
    ``writes`` when given (committed by the caller), else they are written now."""
    own = writes is None
    writes = TrialWrites(trial.study, trial._trial_id) if own else writes
    stem = uuid.uuid4().hex
    ids = {}
    for position, (attr, name, data, mimetype) in enumerate(pictures, start=1):
        artifact_id = f"{stem}-{position}"
        store.write(artifact_id, io.BytesIO(data))
        meta = ArtifactMeta(artifact_id=artifact_id, filename=f"trial{trial.number}-{name}",
                            mimetype=mimetype, encoding=None)
        writes.system_attr(_ARTIFACT_ATTR + artifact_id, json.dumps(asdict(meta)))
        writes.user_attr(attr, artifact_id)
        ids[attr] = artifact_id
    if own:
        writes.commit()
    return ids
