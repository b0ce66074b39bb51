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

from toyworld.world import BACKGROUNDS, COLOURS, PLAIN, SHAPES, SIZE, Style, Subject

WARM = np.array([1.0, 0.55, 0.15], dtype=np.float32)
COOL = np.array([0.15, 0.45, 1.0], dtype=np.float32)
TINT = 0.25  # share of the tint colour at warmth +-1
OUTLINE_WIDTH = 5.0  # px
CHECKER = 16  # px per checkerboard cell
CHECKER_CONTRAST = 0.18
JITTER = 10  # +- levels of per-picture colour jitter


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
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8).reshape(n, SIZE, SIZE, 3)


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
