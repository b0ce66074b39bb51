"""Self-contained HTML pages: the report of one merge (images, ratio chart, scores, the Recipe
and the study's top trials), and merges compared side by side (``render_comparison``).

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
from merge_backend.methods import METHODS, RATIO
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

# A block's role in a study (``roles`` maps block name -> role): "searched" (its own value),
# "tied:GROUP" (one value shared with the other blocks of GROUP) or "fixed".
SEARCHED, FIXED, TIED = "searched", "fixed", "tied:"
_ROLE_COLOURS = {SEARCHED: "#4e79a7", FIXED: "#b8b8b8"}
_TIE_COLOURS = ("#f28e2b", "#59a14f", "#b07aa1", "#e15759", "#76b7b2", "#9c755f", "#ff9da7",
                "#edc948")


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
    if recipe.merge_method.uses_ratio:
        for name in block_names(arch, recipe.vocabulary):
            if name == recipe.text_encoder_block:
                continue
            bars.append((name, recipe.ratios[name], _colour_group(arch, recipe.vocabulary, name)))
    clip = recipe.effective_clip()
    if clip is not None and METHODS[clip.method].comfy[0].kind == RATIO:
        bars.append(("text encoders", clip.ratio, "text"))
    return bars


def _bar_colours(bars: list[tuple[str, float, str]], roles: Mapping[str, str] | None
                 ) -> tuple[list[str], dict[str, str]]:
    """Each bar's fill, and the legend (label -> fill). Without roles: by UNet part."""
    if roles is None:
        return [_COLOURS[g] for _, _, g in bars], {"input blocks": _COLOURS["input"],
                                                     "middle": _COLOURS["middle"],
                                                     "output blocks": _COLOURS["output"]}
    ties = list(dict.fromkeys(r for r in roles.values() if r.startswith(TIED)))
    tie_colour = {t: _TIE_COLOURS[i % len(_TIE_COLOURS)] for i, t in enumerate(ties)}
    fills, legend = [], {}
    for label, _, _ in bars:
        role = roles.get(label, FIXED)
        fill = tie_colour.get(role) or ("url(#fixed)" if role == FIXED else _ROLE_COLOURS[SEARCHED])
        fills.append(fill)
        name = (f"tied: {role[len(TIED):]}" if role.startswith(TIED) else role)
        legend.setdefault(name, fill)
    return fills, legend


def ratio_chart_svg(recipe: Recipe, roles: Mapping[str, str] | None = None) -> str:
    """An SVG bar chart of every block's ratio (model1's share; 1 = model1, 0 = model2), with
    the y axis labelled and each bar's value written on it. ``roles`` (block -> "searched",
    "fixed" or "tied:GROUP") colours searched blocks blue, each tied group in a colour of its
    own and fixed blocks hatched grey, with a legend; without it bars are coloured by UNet part.
    """
    bars = _chart_bars(recipe)
    if not bars:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="420" height="40">'
                f'<text x="4" y="24" font-size="13">{html.escape(recipe.method)}: no per-block '
                f'ratios (multiplier {recipe.multiplier:g})</text></svg>')
    lo = min(0.0, *(v for _, v, _ in bars))
    hi = max(1.0, *(v for _, v, _ in bars))
    top_pad = 46  # room for the legend and the values above the bars

    def y(value: float) -> float:
        return top_pad + (hi - value) / (hi - lo) * _CHART_H

    fills, legend = _bar_colours(bars, roles)
    width = _PAD + _BAR * len(bars) + 60  # room for the last rotated labels
    legend_width = sum(24 + 7 * len(name) for name in legend)
    width = max(width, _PAD + legend_width)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{_CHART_H + top_pad + 110}" font-family="sans-serif" font-size="10">',
             '<defs><pattern id="fixed" width="6" height="6" patternUnits="userSpaceOnUse" '
             'patternTransform="rotate(45)"><rect width="6" height="6" fill="#d9d9d9"/>'
             '<line x1="0" y1="0" x2="0" y2="6" stroke="#8c8c8c" stroke-width="2"/></pattern>'
             '</defs>', '<rect width="100%" height="100%" fill="white"/>']
    x = _PAD
    for name, fill in legend.items():
        parts.append(f'<rect x="{x}" y="4" width="12" height="12" fill="{fill}" stroke="#666" '
                     f'stroke-width="0.5"/><text x="{x + 16}" y="14">{html.escape(name)}</text>')
        x += 24 + 7 * len(name)
    parts.append(f'<text x="{_PAD}" y="28" fill="#555">ratio = model1\'s share</text>')
    for tick in sorted({lo, 0.0, 0.25, 0.5, 0.75, 1.0, hi}):
        parts.append(f'<line x1="{_PAD - 4}" x2="{width}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     f'stroke="{"#999" if tick in (0.0, 1.0) else "#e4e4e4"}"/>'
                     f'<text x="{_PAD - 6}" y="{y(tick) + 3:.1f}" text-anchor="end">{tick:g}'
                     '</text>')
    for i, ((label, value, _), fill) in enumerate(zip(bars, fills)):
        x = _PAD + i * _BAR
        top, bottom = sorted((y(value), y(0.0)))
        text = html.escape(f"{label}: {value:.4g}")
        parts.append(f'<rect x="{x + 2}" y="{top:.1f}" width="{_BAR - 4}" '
                     f'height="{max(bottom - top, 0.5):.1f}" fill="{fill}" stroke="#555" '
                     f'stroke-width="0.3"><title>{text}</title></rect>')
        # the role's colour also as a strip under the axis: seen even where the bar is 0
        parts.append(f'<rect x="{x + 2}" y="{y(lo) + 1:.1f}" width="{_BAR - 4}" height="5" '
                     f'fill="{fill}"/>')
        parts.append(f'<text x="{x + _BAR / 2}" y="{min(top, bottom) - 2:.1f}" '
                     f'text-anchor="middle" font-size="8">{value:.2f}</text>')
        ly = top_pad + _CHART_H + 12
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
.columns { display: flex; gap: 1.2em; align-items: flex-start; overflow-x: auto; }
.column { flex: 0 0 auto; border: 1px solid #ddd; border-radius: 6px; padding: 0.8em;
          background: #fafafa; }
.column h3 { margin: 0 0 0.5em 0; } .column.reference { background: #f1f4f8; }
.column img { max-width: 480px; height: auto; }
.column .what { color: #555; font-size: 0.85em; max-width: 36em; }
code { background: #eee; padding: 0.1em 0.3em; }
"""


@dataclass(frozen=True)
class Column:
    """One merge in a side-by-side comparison: its labelled probe grid (PNG), scores and, for a
    merge, its Recipe (drawn as a ratio chart; ``roles`` as in ``ratio_chart_svg``)."""

    label: str
    png: bytes | None
    scores: Mapping[str, object] | None = None
    recipe: Recipe | None = None
    roles: Mapping[str, str] | None = None
    what: str = ""  # one line under the title: how it was made
    reference: bool = False  # a parent or the uniform merge, not a candidate


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


def _column(column: Column) -> str:
    parts = [f'<div class="column{" reference" if column.reference else ""}">',
             f"<h3>{html.escape(column.label)}</h3>"]
    if column.what:
        parts.append(f'<p class="what">{html.escape(column.what)}</p>')
    if column.png is not None:
        data = base64.b64encode(column.png).decode("ascii")
        parts.append(f'<img alt="probe grid of {html.escape(column.label)}" '
                     f'src="data:image/png;base64,{data}">')
    if column.scores:
        parts.append(_table(column.scores))
    if column.recipe is not None:
        parts.append(ratio_chart_svg(column.recipe, column.roles))
    parts.append("</div>")
    return "\n".join(parts)


def columns_html(columns: Sequence[Column]) -> str:
    """Merges side by side (one scrolling row), each with its grid, scores and ratio chart."""
    return '<div class="columns">' + "\n".join(_column(c) for c in columns) + "</div>"


def _page(title: str, body: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def render_comparison(title: str, columns: Sequence[Column], *,
                      details: Mapping[str, object] | None = None,
                      notes: Sequence[str] = ()) -> str:
    """A self-contained page with ``columns`` side by side (see the module docstring)."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    if details:
        body.append(_table(details))
    body += ["<p>Ratios follow ComfyUI's convention: ratio = model1's share (1 = model1, "
             "0 = model2).</p>", columns_html(columns)]
    if notes:
        body += ["<h2>Notes</h2>", "<ul>", *(f"<li>{html.escape(n)}</li>" for n in notes),
                 "</ul>"]
    return _page(title, body)


def render_report(recipe: Recipe, *, title: str, scores: Mapping[str, object] | None = None,
                  details: Mapping[str, object] | None = None,
                  images: Sequence[ReportImage] = (), notes: Sequence[str] = (),
                  roles: Mapping[str, str] | None = None, top: Sequence[Column] = ()) -> str:
    """The report page as one HTML string (see the module docstring). ``top``: the study's
    best trials, shown side by side after the merge itself."""
    sources = {role: src.path for role, src in recipe.models.items()}
    body = [f"<h1>{html.escape(title)}</h1>",
            _table({"architecture": ARCHITECTURES[recipe.arch].title,
                    "method": f"{recipe.method}: {recipe.merge_method.formula}",
                    "vocabulary": recipe.vocabulary, **sources, **(details or {})})]
    if images:
        body += ["<h2>Probe images</h2>", '<div class="images">',
                 *(_figure(i) for i in images), "</div>"]
    zero = recipe.merge_method.ratio_zero
    body += ["<h2>Ratios</h2>",
             f"<p>ComfyUI's convention: ratio = model1's share (1 = model1, 0 = "
             f"{html.escape(zero)}).</p>", ratio_chart_svg(recipe, roles)]
    if scores:
        body += ["<h2>Scores</h2>", _table(scores)]
    if top:
        body += [f"<h2>The study's top {len(top)}</h2>", columns_html(top)]
    if notes:
        body += ["<h2>Notes</h2>", "<ul>", *(f"<li>{html.escape(n)}</li>" for n in notes),
                 "</ul>"]
    body += ["<h2>Recipe</h2>",
             f"<pre>{html.escape(json.dumps(recipe.to_dict(), indent=2, sort_keys=True))}</pre>"]
    return _page(title, body)
