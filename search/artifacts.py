"""Pictures a trial leaves behind: its probe grid and a per-block ratio chart (PNG)."""

from __future__ import annotations

import io

import torch
from PIL import Image, ImageDraw

BAR_W, CHART_H, PAD = 24, 160, 24


def grid_png(grid: torch.Tensor) -> bytes:
    """A [3, H, W] float image in [0, 1] as PNG bytes (NaN drawn black)."""
    array = (torch.nan_to_num(grid.detach().float().cpu(), nan=0.0).clamp(0, 1) * 255)
    array = array.round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


_SHORT = (("input_blocks.", "i"), ("output_blocks.", "o"), ("middle_block.", "m"),
          ("time_embed.", "time"), ("label_emb.", "label"))


def short_label(name: str) -> str:
    """A block name in at most 5 characters (IN04, OUT11, i4, o11, m1, time, out)."""
    for long, short in _SHORT:
        if name.startswith(long):
            name = short + name[len(long):]
    return name.rstrip(".")[:5]


def ratio_chart_png(ratios: dict[str, float], title: str = "") -> bytes:
    """Bars of model1's share per block (ComfyUI convention), 0 at the bottom, 1 at the top."""
    names = list(ratios)
    width = PAD * 2 + BAR_W * len(names)
    image = Image.new("RGB", (max(width, 200), CHART_H + PAD * 3), "white")
    draw = ImageDraw.Draw(image)
    top, bottom = PAD, PAD + CHART_H
    draw.line([(PAD, top), (width - PAD, top)], fill=(220, 220, 220))
    draw.line([(PAD, (top + bottom) // 2), (width - PAD, (top + bottom) // 2)], fill=(220, 220, 220))
    draw.line([(PAD, bottom), (width - PAD, bottom)], fill=(120, 120, 120))
    for i, name in enumerate(names):
        value = min(max(ratios[name], 0.0), 1.0)
        x = PAD + i * BAR_W
        draw.rectangle([x + 2, bottom - value * CHART_H, x + BAR_W - 2, bottom], fill=(52, 101, 164))
        draw.text((x + 1, bottom + 4 + (i % 2) * 12), short_label(name), fill=(0, 0, 0))
    draw.text((PAD, 4), title or "ratio = model1's share", fill=(0, 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
