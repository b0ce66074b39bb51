"""A self-contained HTML report of one merge: images, ratio chart, scores and the Recipe.

Everything is inline (PNG images as base64 data URLs, the chart as SVG, no scripts, no
external files), so the page can be mailed or archived as one file.

Example:
    >>> html = render_report(recipe, title="trial 7", scores={"clip": 31.2},
    ...                      images=[ReportImage("candidate", png)])   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from merge_backend.architectures import ARCHITECTURES, SINGLE, Architecture, block_names
from merge_backend.recipe import Recipe

_BAR, _CHART_H, _PAD = 22, 180, 40
_COLOURS = {"input": "#4e79a7", "middle": "#f28e2b", "output": "#59a14f", "text": "#9c9c9c"}


@dataclass(frozen=True)
class ReportImage:
    """One labelled image (a probe grid as PNG bytes) shown side by side with the others."""

    label: str
    png: bytes


def png_bytes(image: torch.Tensor) -> bytes:
    """A ``[3, H, W]`` float image in [0, 1] as PNG bytes."""
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- chart


_COARSE = "blocks"  # ModelMergeBlocks' input / middle / out colour the bars where it exists
_COARSE_GROUPS = {"input": "input", "middle": "middle", "out": "output"}


def _colour_group(arch: Architecture, vocabulary: str, block: str) -> str:
    if vocabulary == SINGLE or _COARSE not in arch.vocabularies:
        return "input"
    coarse = arch.slider_block(_COARSE, arch.sliders_of(vocabulary, block)[0])
    return _COARSE_GROUPS.get(coarse, "input")


def _chart_bars(recipe: Recipe) -> list[tuple[str, float, str]]:
    """(label, ratio, group) per bar: every UNet block, then the text encoders if merged."""
    arch = ARCHITECTURES[recipe.arch]
    bars = []
    if recipe.spec.uses_ratio:
        for name in block_names(arch, recipe.vocabulary):
            if name == recipe.text_encoder_block:
                continue
            bars.append((name, recipe.ratios[name], _colour_group(arch, recipe.vocabulary, name)))
    clip = recipe.effective_clip()
    if clip is not None and clip.method == "weighted_sum":
        bars.append(("text encoders", clip.ratio, "text"))
    return bars


def ratio_chart_svg(recipe: Recipe) -> str:
    """An SVG bar chart of every block's ratio (model1's share; 1 = model1, 0 = model2)."""
    bars = _chart_bars(recipe)
    if not bars:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="420" height="40">'
                f'<text x="4" y="24" font-size="13">{html.escape(recipe.method)}: no per-block '
                f'ratios (multiplier {recipe.multiplier:g})</text></svg>')
    lo = min(0.0, *(v for _, v, _ in bars))
    hi = max(1.0, *(v for _, v, _ in bars))

    def y(value: float) -> float:
        return _PAD / 2 + (hi - value) / (hi - lo) * _CHART_H

    width = _PAD + _BAR * len(bars) + 60  # room for the last rotated labels
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{_CHART_H + 130}" font-family="sans-serif" font-size="10">']
    for tick in sorted({lo, 0.0, 0.5, 1.0, hi}):
        parts.append(f'<line x1="{_PAD - 4}" x2="{width}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     f'stroke="#ddd"/><text x="2" y="{y(tick) + 3:.1f}">{tick:g}</text>')
    for i, (label, value, group) in enumerate(bars):
        x = _PAD + i * _BAR
        top, bottom = sorted((y(value), y(0.0)))
        text = html.escape(f"{label}: {value:.4g}")
        parts.append(f'<rect x="{x + 2}" y="{top:.1f}" width="{_BAR - 4}" '
                     f'height="{max(bottom - top, 0.5):.1f}" fill="{_COLOURS[group]}">'
                     f'<title>{text}</title></rect>')
        ly = _PAD / 2 + _CHART_H + 8
        parts.append(f'<text x="{x + _BAR / 2}" y="{ly}" transform="rotate(60 {x + _BAR / 2} '
                     f'{ly})">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------- page

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
.images { display: flex; gap: 1.5em; flex-wrap: wrap; }
figure { margin: 0; } figcaption { font-size: 0.9em; margin-top: 0.3em; }
img { image-rendering: pixelated; min-width: 256px; border: 1px solid #ccc; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; }
pre { background: #f5f5f5; padding: 1em; overflow-x: auto; }
"""


def _figure(image: ReportImage) -> str:
    data = base64.b64encode(image.png).decode("ascii")
    return (f'<figure><img alt="{html.escape(image.label)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{html.escape(image.label)}</figcaption></figure>')


def _table(rows: Mapping[str, object]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_show(v))}</td></tr>"
                    for k, v in rows.items())
    return f"<table>{cells}</table>"


def _show(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def render_report(recipe: Recipe, *, title: str, scores: Mapping[str, object] | None = None,
                  details: Mapping[str, object] | None = None,
                  images: Sequence[ReportImage] = (), notes: Sequence[str] = ()) -> str:
    """The report page as one HTML string (see the module docstring)."""
    sources = {role: src.path for role, src in recipe.models.items()}
    body = [f"<h1>{html.escape(title)}</h1>",
            _table({"architecture": ARCHITECTURES[recipe.arch].title, "method": recipe.method,
                    "vocabulary": recipe.vocabulary, **sources, **(details or {})})]
    if images:
        body += ["<h2>Probe images</h2>", '<div class="images">',
                 *(_figure(i) for i in images), "</div>"]
    zero = ("model1 + multiplier·(model2 − base)" if recipe.method == "add_difference"
            else "model2")
    body += ["<h2>Ratios</h2>",
             f"<p>ComfyUI's convention: ratio = model1's share (1 = model1, 0 = "
             f"{html.escape(zero)}).</p>", ratio_chart_svg(recipe)]
    if scores:
        body += ["<h2>Scores</h2>", _table(scores)]
    if notes:
        body += ["<h2>Notes</h2>", "<ul>", *(f"<li>{html.escape(n)}</li>" for n in notes),
                 "</ul>"]
    body += ["<h2>Recipe</h2>",
             f"<pre>{html.escape(json.dumps(recipe.to_dict(), indent=2, sort_keys=True))}</pre>"]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
