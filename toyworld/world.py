"""What the toy world holds: its words, its styles, which prompts are held out, its captions.

Pictures are 64x64 (a 16x16x4 latent in the shipped world's VAE, which downsamples 4x; 8x8
in the first world's 8x VAE): one large shape in one colour on a plain background. On top of
the plain look there are style attributes, each in [0, 1] (warmth in [-1, 1]) and all at least
a few pixels wide, since finer detail does not survive the VAE:

- ``warmth``: the whole picture tinted towards orange (+) or blue (-): a global, low-frequency
  change;
- ``soft``: the shape's edge blurred over ~8 px: a soft, filled look;
- ``outline``: a 5 px contrasting ring around the shape: an edge;
- ``texture``: a 16 px checkerboard in the background;
- whole-picture looks (``LOOKS``): contrast, saturation, light (a gamma), a hue turn, blur, a
  horizontal or vertical stretch and a vignette, each applied to the finished picture
  (``draw.apply_looks``).

Fine-tune A is ``warm + soft`` and fine-tune B is ``cool + outlined + checkered``; in the
shipped world the two also have opposite whole-picture looks (``STYLE_A_LOOKS``,
``STYLE_B_LOOKS``; the first world's styles had none). The house style the aesthetic head
prefers (``HOUSE``) takes A's palette and B's edges, a look neither parent has alone. Captions
name shape, colour and background (``CAPTION``); the CLIP scorer additionally reads style
and look words (``style_words``). ``HELD_OUT`` combinations never appear in any training set:
acceptance figures are measured on them.

Example:
    >>> caption(Subject("circle", "red", "white"))
    'a red circle on a white background'
    >>> style_words(STYLE_B)
    'cool, outlined, checkered'
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
# name -> RGB 0..255; hues far apart so a tint never makes one look like another
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 80, 215),
           "yellow": (240, 205, 40)}
BACKGROUNDS = {"white": (236, 236, 232), "gray": (128, 128, 128), "black": (28, 28, 30)}
# what a caption names, as Subject fields -> their values (what zero-shot naming asks)
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS)}
CAPTION = "a {colour} {shape} on a {background} background"
# How a world's probes are drawn (the demo, the study config, the acceptance figures), unless
# its build plan names other sampling (toyworld.files.world_sampling); the world's scheduler
# config spaces the steps "trailing" (merge_backend/architectures/sd1.yaml)
SAMPLING = {"steps": 5, "cfg": 4.0, "width": SIZE, "height": SIZE, "scheduler": "euler"}


@dataclass(frozen=True)
class Subject:
    """What a caption names: one shape, its colour, the background colour."""

    shape: str
    colour: str
    background: str


@dataclass(frozen=True)
class Style:
    """Style attributes: warmth in [-1, 1] (cool .. warm), the others in [0, 1]."""

    warmth: float = 0.0
    soft: float = 0.0
    outline: float = 0.0
    texture: float = 0.0
    # whole-picture looks, 0 for none: contrast, saturation, light and stretch signed (+1 / -1:
    # full strength one way or the other; stretch + wider, - taller), the others from 0 to 1;
    # what each does at full strength: draw.apply_looks. A style may go past full strength.
    contrast: float = 0.0
    saturation: float = 0.0
    light: float = 0.0
    hue: float = 0.0
    blur: float = 0.0
    stretch: float = 0.0
    vignette: float = 0.0

    def has_looks(self) -> bool:
        return any(getattr(self, name) for name in LOOKS)


# look -> (its word at +1, its word at -1, or None for a look in [0, 1]), each one CLIP
# token: a caption with every word stays within the CLIP's 32 tokens; the order is the order
# draw.apply_looks applies them in
LOOKS = {"contrast": ("bold", "flat"), "saturation": ("vivid", "muted"),
         "light": ("bright", "dark"), "hue": ("shifted", None), "blur": ("blurry", None),
         "stretch": ("wide", "tall"), "vignette": ("framed", None)}

PLAIN = Style()
STYLE_A = Style(warmth=1.0, soft=1.0)  # soft, warm, filled
STYLE_B = Style(warmth=-1.0, outline=1.0, texture=1.0)  # outlined, cool, textured
HOUSE = Style(warmth=1.0, outline=1.0)  # A's palette with B's edges
STYLES = {"plain": PLAIN, "a": STYLE_A, "b": STYLE_B}
# the style each checkpoint of a world is trained on, unless its build plan names others
STYLED = {"base": PLAIN, "style_a": STYLE_A, "style_b": STYLE_B}
# The same two styles with opposite whole-picture looks on top, each at twice the strength the
# scorers learn (saturation at 1.5 times, blur at 1): A bold, vivid, bright, stretched wide and
# framed by a vignette; B flat, muted, dark, hue-shifted, blurry and stretched tall. The looks
# spread what a fine-tune changes over more of the UNet's blocks: a merge of the two moved
# 15-16 blocks at full strength, 17-19 at 1.5 times, and with the shipped plan's faster
# fine-tunes 14-15 at 1.5 times, 18-19 at twice and 16-20 at 2.5 times (RESULTS.md, issue 14,
# eleventh, twelfth and sixteenth passes). Saturation stays at 1.5: at twice, B's pictures
# would keep no colour.
STYLE_A_LOOKS = replace(STYLE_A, contrast=2.0, saturation=1.5, light=2.0, stretch=2.0,
                        vignette=2.0)
STYLE_B_LOOKS = replace(STYLE_B, contrast=-2.0, saturation=-1.5, light=-2.0, hue=2.0, blur=1.0,
                        stretch=-2.0)

# Held out of every training set; each shape and each colour appears twice.
HELD_OUT = (
    Subject("circle", "red", "gray"), Subject("circle", "blue", "black"),
    Subject("square", "green", "white"), Subject("square", "yellow", "gray"),
    Subject("triangle", "blue", "white"), Subject("triangle", "red", "black"),
    Subject("cross", "yellow", "black"), Subject("cross", "green", "gray"),
)


def all_subjects() -> list[Subject]:
    return [Subject(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, BACKGROUNDS)]


def training_subjects() -> list[Subject]:
    """Every combination not held out (40 of 48)."""
    return [s for s in all_subjects() if s not in HELD_OUT]


def probe_subjects() -> list[Subject]:
    """The four training subjects a study of this world probes with (the demo, the house-style
    study config, the sensitivity figure): one per shape, each red on white."""
    return training_subjects()[::10]


def probe_prompts() -> list[str]:
    return [caption(s) for s in probe_subjects()]


def caption(subject: Subject) -> str:
    return CAPTION.format(shape=subject.shape, colour=subject.colour,
                          background=subject.background)


def style_words(style: Style) -> str:
    """The words the CLIP scorer learns for a style (attributes past half strength; the
    looks' words in one comma-free group at the end)."""
    words = []
    if style.warmth >= 0.5:
        words.append("warm")
    elif style.warmth <= -0.5:
        words.append("cool")
    if style.soft >= 0.5:
        words.append("soft")
    if style.outline >= 0.5:
        words.append("outlined")
    if style.texture >= 0.5:
        words.append("checkered")
    looks = []
    for name, (plus, minus) in LOOKS.items():
        value = getattr(style, name)
        if value >= 0.5:
            looks.append(plus)
        elif value <= -0.5 and minus:
            looks.append(minus)
    if looks:
        words.append(" ".join(looks))
    return ", ".join(words)


def styled_caption(subject: Subject, style: Style) -> str:
    words = style_words(style)
    return caption(subject) + (f", {words}" if words else "")


def house_score(style: Style) -> float:
    """What the aesthetic head learns to predict: half the warmth plus the whole outline.

    1.5 for ``HOUSE``; fine-tune A's style and B's style score 0.5 each, plain 0: the two
    parents' looks are worth the same, and only a merge that takes A's palette and B's edges
    scores higher. Measured on the merges of the shipped fine-tunes: with equal weights
    (``0.5 warmth + 0.5 outline``) style_a scored 0.46 against a best block split of 0.48 on
    the training probes (B -0.05), since an outline survives a merge more weakly than a tint;
    with the outline weighted twice, A 0.52, B 0.31, best split 0.81. Softness does not count:
    every picture the world's VAE decodes is somewhat soft (a first head with
    ``outline * (1 - soft)`` could not be beaten by any merge).
    """
    return 0.5 * style.warmth + style.outline


SIZE_WORDS = ("large", "small")
PLACE_WORDS = (("top", "bottom"), ("left", "right"))


def layout_words(x: float, y: float, radius: float) -> str:
    """Where a picture's shape is and how big, in the words a CLIP scorer that learns layout
    reads (``TrainCLIP.layout_words``): "large" from a radius of 16 px, else "small"; "top" /
    "bottom" and "left" / "right" for a centre more than 4 px from the middle.

    >>> layout_words(23.0, 40.0, 18.0)
    'large, bottom left'
    """
    def side(value: float, words: tuple[str, str]) -> str:
        return words[0] if value < SIZE / 2 - 4 else words[1] if value > SIZE / 2 + 4 else ""

    place = " ".join(w for w in (side(y, PLACE_WORDS[0]), side(x, PLACE_WORDS[1])) if w)
    size = SIZE_WORDS[0] if radius >= 16 else SIZE_WORDS[1]
    return f"{size}, {place}" if place else size


def vocabulary(layout: bool = False, looks: bool = False) -> list[str]:
    """Every word a caption of this world can hold (the tokens the text encoders learn);
    ``layout``: with the words of ``layout_words`` too; ``looks``: with the looks' words."""
    words = {"a", "on", "background", ","} | set(SHAPES) | set(COLOURS) | set(BACKGROUNDS)
    words |= {"warm", "cool", "soft", "outlined", "checkered"}
    if layout:
        words |= set(SIZE_WORDS) | {w for pair in PLACE_WORDS for w in pair}
    if looks:
        words |= {w for pair in LOOKS.values() for w in pair if w}
    return sorted(words)


def random_style(rng, continuous: float = 0.3, looks: float = 0.0) -> Style:
    """A style with each attribute off or full (or, with probability ``continuous``, anywhere
    in its range): the mixed looks merges produce, for the scorers to learn. With probability
    ``looks`` it has whole-picture looks too, drawn the same way."""
    def pick(values: tuple[float, ...], low: float) -> float:
        if rng.random() < continuous:
            return float(rng.uniform(low, 1.0))
        return float(values[rng.integers(0, len(values))])

    style = Style(warmth=pick((-1.0, 0.0, 1.0), -1.0), soft=pick((0.0, 1.0), 0.0),
                  outline=pick((0.0, 1.0), 0.0), texture=pick((0.0, 1.0), 0.0))
    if not looks or (looks < 1 and rng.random() >= looks):
        return style
    # a look with a word for each end is signed
    return replace(style, **{name: pick((-1.0, 0.0, 1.0), -1.0) if minus
                             else pick((0.0, 1.0), 0.0) for name, (_, minus) in LOOKS.items()})
