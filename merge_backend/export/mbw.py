"""SuperMerger's block-weight (MBW) strings, and the conversions between block vocabularies.

SuperMerger writes a block merge as one comma-separated line of alphas in the order BASE,
IN00.., M00, OUT.. (26 values for SD1/SD2, 20 for SDXL). Its alpha is model B's share, so for a
weighted sum ``alpha = 1 - ratio`` (ratio = model1's share, ComfyUI's convention). For
add-difference SuperMerger computes ``A + alpha * (B - C)`` per block, so
``alpha = (1 - ratio) * multiplier``. Subtract and add have no SuperMerger block-weight form.
Each method says which form it has (``supermerger`` in merge_backend.methods).

What each vocabulary loses on the way to an MBW string (``mbw_ratios``); the MBW blocks are the
architecture file's ``mbw`` groups of ComfyUI's sliders, and every conversion goes through them
(``architectures.convert_ratios``):
- ``mbw``, ``single``, ``blocks``: nothing. ModelMergeBlocks gives time_embed / label_emb the
  ``input`` ratio and ``out.`` the ``out`` ratio, exactly where SuperMerger puts them.
- ``comfy``: SuperMerger has one weight where ComfyUI has several sliders: IN00 covers
  ``time_embed.``, ``label_emb.`` (SDXL) and ``input_blocks.0.``; M00 covers the three
  ``middle_block.`` sliders; the last OUT covers ``out.``. When those differ the conversion
  **raises** ``MbwError`` naming the sliders; with ``lossy=True`` it uses the group's rule
  (``input_blocks.0.``, the mean of the middle sliders, the last ``output_blocks.``) and
  returns a note for each.
- BASE is the text encoders: 1 - the CLIPMergeSimple ratio (alpha 0 when the recipe keeps
  model1's). A CLIPMergeSubtract / Add, or any text-encoder merge under add-difference, has no
  BASE equivalent and raises. SuperMerger also blends the VAE by BASE; ComfyUI keeps model1's,
  so the two tools differ there when the parents' VAEs differ.

Example:
    >>> from merge_backend.recipe import Recipe, Source, uniform_ratios
    >>> r = Recipe(arch="sdxl", method="weighted_sum", vocabulary="mbw",
    ...            ratios=uniform_ratios("sdxl", "mbw", 0.25),
    ...            models={"model1": Source("a.safetensors"), "model2": Source("b.safetensors")})
    >>> mbw_string(r).split(",")[:3]
    ['0.75', '0.75', '0.75']
    >>> parse_mbw(mbw_string(r), "sdxl") == r.ratios
    True
"""

from __future__ import annotations

import math

from merge_backend.architectures import ARCHITECTURES, SLIDERS, Architecture, convert_ratios
from merge_backend.methods import METHODS, SuperMerger
from merge_backend.recipe import Recipe

DEFAULT_DIGITS = 6  # decimals written; ratios with at most this many decimals round-trip exactly
MBW = "mbw"


class MbwError(ValueError):
    """A recipe with no exact SuperMerger block-weight form, or an MBW string that is malformed."""


# ---------------------------------------------------------------------------- vocabularies


def mbw_to_comfy(arch: Architecture, ratios: dict[str, float]) -> dict[str, float]:
    """MBW ratios (BASE ignored) as the architecture's ComfyUI slider values, in the node's order.

    Exact: every key gets the same ratio under both vocabularies (each slider lies in one MBW
    group: time_embed / label_emb with IN00 and ``out.`` with the last OUT, as SuperMerger and
    ``block_of`` do).
    """
    return convert_ratios(arch, ratios, MBW, SLIDERS)[0]


def _mbw_vocabulary(arch: Architecture):
    if MBW not in arch.vocabularies:
        raise MbwError(f"recipe.arch: {arch.title} has no SuperMerger block weights (no mbw "
                       f"vocabulary in {arch.source})")
    return arch.vocabularies[MBW]


def _unet_ratios(recipe: Recipe, lossy: bool) -> tuple[dict[str, float], list[str]]:
    arch = ARCHITECTURES[recipe.arch]
    _mbw_vocabulary(arch)
    ratios, conflicts = convert_ratios(arch, recipe.ratios, recipe.vocabulary, MBW)
    notes: list[str] = []
    for block, values, value in conflicts:
        shown = ", ".join(f"{k}={v:g}" for k, v in values.items())
        msg = f"SuperMerger has one weight ({block}) for the ComfyUI sliders {shown}; they differ"
        if not lossy:
            raise MbwError(msg + " — pass lossy=True (--mbw-lossy) to write "
                           f"{block}={value:g} anyway")
        notes.append(f"{msg}: wrote {block}={value:g}")
    return ratios, notes


def _text_encoder_ratio(recipe: Recipe, form: SuperMerger) -> float:
    """BASE as a ratio (model1's share of the text encoders)."""
    clip = recipe.effective_clip()
    if clip is None:
        return 1.0
    if form.text_encoder_refusal:
        raise MbwError(f"recipe.clip: {form.text_encoder_refusal}")
    node = METHODS[clip.method].clip_node
    if node != "CLIPMergeSimple":
        raise MbwError(f"recipe.clip.method: {clip.method} ({node}) has no SuperMerger BASE "
                       "equivalent; only a weighted sum (CLIPMergeSimple) does")
    return clip.ratio


def mbw_ratios(recipe: Recipe, *, lossy: bool = False) -> tuple[dict[str, float], list[str]]:
    """The recipe's ratios in the mbw vocabulary (ComfyUI convention, BASE first) and notes
    on anything ``lossy=True`` had to approximate. Raises MbwError (see the module docstring)."""
    recipe.validate()
    form = _supermerger(recipe.method)
    unet, notes = _unet_ratios(recipe, lossy)
    base = _mbw_vocabulary(ARCHITECTURES[recipe.arch]).text_encoders
    return {base: _text_encoder_ratio(recipe, form), **unet}, notes


def _supermerger(method: str) -> SuperMerger:
    """The method's SuperMerger form (merge_backend.methods), or MbwError saying who has one."""
    form = METHODS[method].supermerger
    if form is None:
        having = [name for name, m in METHODS.items() if m.supermerger is not None]
        raise MbwError(f"recipe.method: {method} has no SuperMerger block-weight string "
                       f"(only {' and '.join(having)} do)")
    return form


# ---------------------------------------------------------------------------- strings


def _fmt(value: float, digits: int) -> str:
    text = f"{round(value, digits) + 0.0:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def mbw_string(recipe: Recipe, *, digits: int = DEFAULT_DIGITS, lossy: bool = False) -> str:
    """SuperMerger's block-weight line for ``recipe``: alphas, BASE,IN00..,M00,OUT.."""
    ratios, _ = mbw_ratios(recipe, lossy=lossy)
    form = _supermerger(recipe.method)
    return ",".join(_fmt(form.alpha(r, recipe.multiplier), digits) for r in ratios.values())


def parse_mbw(text: str, arch: str, *, method: str = "weighted_sum", multiplier: float = 1.0,
              digits: int = DEFAULT_DIGITS) -> dict[str, float]:
    """The ratios (mbw vocabulary, ComfyUI convention) an MBW alpha line describes.

    ``method``/``multiplier`` say how the alphas were made (see the module docstring). Ratios
    are rounded to ``digits`` decimals, so ``parse_mbw(mbw_string(r))`` gives back ratios with
    at most that many decimals exactly.
    """
    names = _mbw_vocabulary(ARCHITECTURES[arch]).block_names
    parts = [p.strip() for p in text.strip().split(",")]
    if len(parts) != len(names):
        raise MbwError(f"MBW string has {len(parts)} values; {arch} needs {len(names)} "
                       f"({names[0]}, {names[1]}, …, {names[-1]})")
    scale = _supermerger(method).scale(multiplier)
    if scale == 0:
        raise MbwError("multiplier 0: every alpha is 0 and no ratio can be recovered")
    out = {}
    for name, part in zip(names, parts):
        try:
            alpha = float(part)
        except ValueError:
            raise MbwError(f"MBW value for {name} is {part!r}, not a number") from None
        if not math.isfinite(alpha):
            raise MbwError(f"MBW value for {name} is {part!r}, not a finite number")
        out[name] = round(1.0 - alpha / scale, digits) + 0.0
    return out
