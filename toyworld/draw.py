"""Pictures of the toy world drawn by code: signed-distance shapes, vectorised over a batch.

Every picture is a function of its ``Scene`` (subject, style, placement), so the same seed
always draws the same data set. Shapes are drawn from signed distance fields, which gives
anti-aliased edges, a soft edge of any width and a ring of any width outside the shape with
the same few lines.

Example:
    >>> scenes = random_scenes(np.random.default_rng(0), 4, [Subject("circle", "red", "white")])
    >>> draw(scenes).shape
    (4, 64, 64, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from toyworld.world import BACKGROUNDS, COLOURS, LOOKS, PLAIN, SHAPES, SIZE, Style, Subject

WARM = np.array([1.0, 0.55, 0.15], dtype=np.float32)
COOL = np.array([0.15, 0.45, 1.0], dtype=np.float32)
TINT = 0.25  # share of the tint colour at warmth +-1
OUTLINE_WIDTH = 5.0  # px
CHECKER = 16  # px per checkerboard cell
CHECKER_CONTRAST = 0.18
JITTER = 10  # +- levels of per-picture colour jitter
# the looks at full strength (world.LOOKS): contrast and saturation factors 1 +- these, the
# gamma 1 -+ LIGHT, the hue turn in radians, the stretch factor 1 + STRETCH, the vignette's
# darkening in the corners of the picture: twice the sixth pass's spans (RESULTS.md, issue 14,
# eleventh pass)
CONTRAST, SATURATION, LIGHT, HUE, STRETCH, VIGNETTE = 0.3, 0.5, 0.3, 0.5, 0.16, 0.6
BLUR_KERNEL = np.array([1.0, 4.0, 6.0, 4.0, 1.0], dtype=np.float32) / 16  # binomial, 5 px


@dataclass(frozen=True)
class Layout:
    """Where a data set's shapes go: centres uniform within ``spread`` px of ``centre`` (x and
    y apart), radii uniform in ``radius`` (px)."""

    centre: tuple[float, float] = (32.0, 32.0)
    spread: float = 5.0
    radius: tuple[float, float] = (16.0, 21.0)


CENTRED = Layout()  # the shipped world's pictures, every style alike


@dataclass(frozen=True)
class Scenes:
    """A batch of pictures to draw: one entry per picture in every array."""

    subjects: list[Subject]
    styles: list[Style]
    centre: np.ndarray  # [N, 2] x, y in px
    radius: np.ndarray  # [N] px
    jitter: np.ndarray  # [N, 2, 3] colour offsets for shape and background, levels
    phase: np.ndarray  # [N, 2] checkerboard offset, px

    def __len__(self) -> int:
        return len(self.subjects)


def random_scenes(rng: np.random.Generator, n: int, subjects: Sequence[Subject],
                  style: Style | Callable[[np.random.Generator], Style] = PLAIN,
                  layout: Layout = CENTRED) -> Scenes:
    """``n`` scenes of subjects drawn uniformly from ``subjects``, placed at random as
    ``layout`` says.

    ``style`` is one style for all, or a function drawing one per picture.
    """
    picked = [subjects[i] for i in rng.integers(0, len(subjects), n)]
    styles = [style(rng) if callable(style) else style for _ in range(n)]
    centre = np.asarray(layout.centre, dtype=np.float64)
    return Scenes(picked, styles, centre=centre + rng.uniform(-layout.spread, layout.spread, (n, 2)),
                  radius=rng.uniform(*layout.radius, n),
                  jitter=rng.uniform(-JITTER, JITTER, (n, 2, 3)),
                  phase=rng.uniform(0, CHECKER, (n, 2)))


def draw(scenes: Scenes, chunk: int = 128) -> np.ndarray:
    """``[N, 64, 64, 3]`` uint8 pictures of ``scenes`` (drawn ``chunk`` at a time, in cache)."""
    return np.concatenate([_draw(_slice(scenes, i, i + chunk))
                           for i in range(0, len(scenes), chunk)])


def _slice(scenes: Scenes, start: int, stop: int) -> Scenes:
    return Scenes(scenes.subjects[start:stop], scenes.styles[start:stop],
                  scenes.centre[start:stop], scenes.radius[start:stop],
                  scenes.jitter[start:stop], scenes.phase[start:stop])


def _draw(scenes: Scenes) -> np.ndarray:
    n = len(scenes)
    attr = np.array([[s.warmth, s.soft, s.outline, s.texture] for s in scenes.styles],
                    dtype=np.float32)
    warmth, soft, outline, texture = (attr[:, i, None, None] for i in range(4))
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    px = x[None] - scenes.centre[:, 0, None, None].astype(np.float32)
    py = y[None] - scenes.centre[:, 1, None, None].astype(np.float32)
    sdf = _shape_sdf(scenes, px, py)
    # edge width: ~1 px anti-aliasing when sharp, ~8 px when soft
    fill = _sigmoid(-sdf / (0.35 + 2.0 * soft))
    ring = np.clip(0.5 - (np.abs(sdf - OUTLINE_WIDTH / 2) - OUTLINE_WIDTH / 2), 0, 1) * outline
    shape_rgb = _rgb([COLOURS[s.colour] for s in scenes.subjects], scenes.jitter[:, 0])
    bg_rgb = _rgb([BACKGROUNDS[s.background] for s in scenes.subjects], scenes.jitter[:, 1])
    bg_light = bg_rgb.mean(axis=-1) > 0.5  # [N, 1, 1]
    # checkerboard: every other 16 px cell moves towards the other end of the brightness range
    cell = (np.floor((x[None] + scenes.phase[:, 0, None, None]) / CHECKER)
            + np.floor((y[None] + scenes.phase[:, 1, None, None]) / CHECKER)) % 2
    shift = np.where(bg_light, -1.0, 1.0).astype(np.float32) * CHECKER_CONTRAST * texture * cell
    image = bg_rgb + shift[..., None]
    image = image * (1 - fill[..., None]) + shape_rgb * fill[..., None]
    # a dark ring on a light background, a light one on a dark background
    ring_rgb = np.where(bg_light[..., None], 0.1, 0.92).astype(np.float32)
    image = image * (1 - ring[..., None]) + ring_rgb * ring[..., None]
    tint = np.where(warmth[..., None] >= 0, WARM, COOL)
    share = np.float32(TINT) * np.abs(warmth)[..., None]
    image = image * (1 - share) + tint * share
    if any(s.has_looks() for s in scenes.styles):
        image = apply_looks(image, scenes.styles)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8).reshape(n, SIZE, SIZE, 3)


def apply_looks(image: np.ndarray, styles: Sequence[Style]) -> np.ndarray:
    """``[N, H, W, 3]`` pictures in [0, 1] with each one's whole-picture looks applied, in the
    order of ``world.LOOKS``:

    - contrast ``c``: every value moved from the picture's mean grey by the factor
      ``1 + CONTRAST c``;
    - saturation ``s``: from each pixel's grey by ``1 + SATURATION s``;
    - light ``l``: clipped to [0, 1], then to the power ``1 - LIGHT l`` (+ brighter);
    - hue ``h``: colours turned by ``HUE h`` radians about the grey axis (Rodrigues);
    - blur ``b``: a share ``b`` of a 5 px binomial blur (edges repeated);
    - stretch ``t``: scaled about the centre by ``1 + STRETCH |t|``, horizontally for ``t > 0``
      and vertically for ``t < 0`` (linear interpolation, edges repeated);
    - vignette ``v``: multiplied by ``1 - VIGNETTE v r^2 / 2``, ``r`` the distance from the
      centre with the picture's edges at +-1.
    """
    look = {name: np.array([getattr(s, name) for s in styles], dtype=np.float32)[:, None, None]
            for name in LOOKS}
    grey = image.mean(axis=-1, keepdims=True)
    mean = grey.mean(axis=(1, 2), keepdims=True)
    image = (image - mean) * (1 + CONTRAST * look["contrast"])[..., None] + mean
    grey = image.mean(axis=-1, keepdims=True)
    image = grey + (image - grey) * (1 + SATURATION * look["saturation"])[..., None]
    image = np.clip(image, 0, 1) ** (1 - LIGHT * look["light"])[..., None]
    image = np.einsum("nij,nhwj->nhwi", _hue_turns(HUE * look["hue"][:, 0, 0]), image)
    image = image + look["blur"][..., None] * (_blur(image) - image)
    stretch = look["stretch"][:, 0, 0]
    for axis, pick in ((2, stretch > 0), (1, stretch < 0)):
        if pick.any():
            image[pick] = _stretch(image[pick], 1 + STRETCH * np.abs(stretch[pick]), axis)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    r2 = ((2 * x + 1) / SIZE - 1) ** 2 + ((2 * y + 1) / SIZE - 1) ** 2
    return image * (1 - VIGNETTE * look["vignette"] * r2 / 2)[..., None]


def _hue_turns(angles: np.ndarray) -> np.ndarray:
    """``[N, 3, 3]`` rotations by ``angles`` about the grey axis."""
    k = np.ones(3, dtype=np.float32) / np.sqrt(3.0)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=np.float32)
    cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    return (cos * np.eye(3, dtype=np.float32) + sin * cross
            + (1 - cos) * np.outer(k, k)).astype(np.float32)


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable binomial blur over the H and W axes of ``[N, H, W, 3]``, edges repeated."""
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (2, 2)
        padded = np.pad(image, pad, mode="edge")
        image = sum(w * np.take(padded, np.arange(i, i + SIZE), axis=axis)
                    for i, w in enumerate(BLUR_KERNEL))
    return image


def _stretch(image: np.ndarray, factor: np.ndarray, axis: int) -> np.ndarray:
    """``[N, H, W, 3]`` scaled by ``factor`` (per picture) about the centre along ``axis``
    (1: rows, 2: columns): output pixel ``i`` reads the input at ``(i + 0.5 - SIZE / 2) /
    factor + SIZE / 2 - 0.5``, linearly interpolated, clamped to the edge."""
    if axis == 2:
        return _stretch(image.transpose(0, 2, 1, 3), factor, 1).transpose(0, 2, 1, 3)
    pos = (np.arange(SIZE, dtype=np.float32)[None] + 0.5 - SIZE / 2) / factor[:, None]
    pos = np.clip(pos + SIZE / 2 - 0.5, 0, SIZE - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, SIZE - 1)
    frac = (pos - low).astype(np.float32)[:, :, None, None]
    rows = np.arange(len(image))[:, None]
    return image[rows, low] * (1 - frac) + image[rows, high] * frac


def _rgb(colours: list[tuple[int, int, int]], jitter: np.ndarray) -> np.ndarray:
    rgb = (np.array(colours, dtype=np.float32) + jitter.astype(np.float32)) / 255.0
    return np.clip(rgb, 0, 1)[:, None, None, :]


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * v))


def _shape_sdf(scenes: Scenes, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance (px, negative inside) to each picture's shape, centred at (0, 0)."""
    kinds = np.array([s.shape for s in scenes.subjects])
    out = np.empty_like(px)
    for kind, sdf in _SDFS.items():
        pick = kinds == kind
        if pick.any():
            out[pick] = sdf(px[pick], py[pick], scenes.radius[pick, None, None].astype(px.dtype))
    return out


_SDFS = {
    "circle": lambda x, y, r: np.hypot(x, y) - r,
    # a square as wide as the circle: its corners stick out, so the two differ at 8 px cells
    "square": lambda x, y, r: _box(x, y, r, r),
    "cross": lambda x, y, r: np.minimum(_box(x, y, r, 0.35 * r), _box(x, y, 0.35 * r, r)),
    # centred on its centroid, pointing up
    "triangle": lambda x, y, r: _triangle(x, y + 0.2 * r, 1.05 * r),
}
assert set(_SDFS) == set(SHAPES)


def _box(px: np.ndarray, py: np.ndarray, hx: np.ndarray, hy: np.ndarray) -> np.ndarray:
    qx, qy = np.abs(px) - hx, np.abs(py) - hy
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _triangle(px: np.ndarray, py: np.ndarray, half_side: np.ndarray) -> np.ndarray:
    """Equilateral triangle pointing up (image y grows downwards), centred on its centroid."""
    k = np.sqrt(3.0)
    x = np.abs(px) - half_side
    y = -py + half_side / k
    flip = x + k * y > 0
    x, y = np.where(flip, (x - k * y) / 2, x), np.where(flip, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * half_side, 0)
    return -np.hypot(x, y) * np.sign(y)
