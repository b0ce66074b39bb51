"""Smooth ratio curves over the UNet's depth: structured warm starts (``warm_start.curves``).

Users of MBW merges think in shapes over the blocks — flat, a V (the parents' ends, the other
parent's middle), an A, a ramp from input to output, a step — rather than 26 free numbers.
``warm_start.curves: K`` queues K such shapes before the sampler takes over: each curve runs
along the vocabulary's blocks in their order (input side first, the middle block, then the
output side; tied blocks at their mean position) through ``CONTROL`` control points spread evenly
over that path, smoothly (cosine easing between neighbours). The control points, and any extra
parameter (text-encoder ratio, multiplier), come from a scrambled Sobol sequence over their
bounds seeded with ``sampler.seed``: K curves that cover the shapes evenly, the same K for the
same seed.

Example:
    >>> [round(v, 3) for v in curve_values([0.0, 1.0, 0.0], [0.0, 0.25, 0.5, 1.0])]
    [0.0, 0.5, 1.0, 0.0]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

CONTROL = 4


def curve_values(control: Sequence[float], positions: Sequence[float]) -> list[float]:
    """The curve through ``control`` (evenly spaced over [0, 1]) at each of ``positions``."""
    if len(control) == 1:
        return [float(control[0])] * len(positions)
    out = []
    segments = len(control) - 1
    for t in positions:
        i = min(int(t * segments), segments - 1)
        local = t * segments - i
        ease = (1 - math.cos(math.pi * local)) / 2
        out.append(float(control[i] + (control[i + 1] - control[i]) * ease))
    return out


def curve_starts(space, count: int, seed: int) -> list[tuple[str, dict[str, float]]]:
    """(label, Optuna params) of ``count`` smooth curves over ``space``'s searched blocks."""
    if count <= 0:
        return []
    from scipy.stats import qmc

    order = {name: i for i, name in enumerate(n for n in space.names if n != space.te_block)}
    blocks = [p for p in space.params if p.blocks]
    where = [sum(order[b] for b in p.blocks) / len(p.blocks) for p in blocks]
    top = max(max(where), 1e-12)
    positions = [w / top for w in where]
    dims = CONTROL + len(space.extra)
    with warnings.catch_warnings():  # Sobol's balance notice for counts not a power of 2
        warnings.simplefilter("ignore", UserWarning)
        points = qmc.Sobol(dims, scramble=True, seed=seed).random(count)
    starts = []
    for k, point in enumerate(points):
        control = list(point[:CONTROL])
        params = {}
        for p, value in zip(blocks, curve_values(control, positions)):
            params[p.name] = p.low + (p.high - p.low) * value
        for p, value in zip(space.extra, point[CONTROL:]):
            params[p.name] = p.low + (p.high - p.low) * float(value)
        shape = "-".join(f"{c:.2f}" for c in control)
        starts.append((f"curve {k + 1} ({shape})", params))
    return starts
