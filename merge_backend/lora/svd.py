"""Low-rank factors of a weight difference: SVD (exact or randomized) and the quantile clamp.

``factorize(delta, rank)`` returns ``up = U·diag(S)`` and ``down = Vh`` truncated to
``r = min(rank, out, in)`` in float32 (a 3x3 conv is flattened to out x in·9 first), as
ComfyUI's "Extract and Save Lora" and kohya's extractor do. ``clamp_factors`` then clips both
to ± the 0.99 quantile of their concatenated values, computed exactly with ``kthvalue``
(``torch.quantile`` refuses inputs over 2**24 elements).

Example:
    >>> import torch
    >>> d = torch.randn(64, 32) @ torch.randn(32, 48)
    >>> up, down = factorize(d, 32, method="exact")
    >>> bool(torch.allclose(up @ down, d, atol=1e-3))
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

SVD_METHODS = ("exact", "lowrank", "auto")
CLAMP_QUANTILE = 0.99
LOWRANK_NITER = 4
LOWRANK_SEED = 0
# "auto" picks the randomized SVD when the components it computes (rank + oversampling) are at
# most this share of the matrix's smaller side: on SD1.5 shapes on 2 CPU cores it was as fast
# as the exact SVD at ~0.6 and 10-100x faster below 0.15 (benchmarks/lora_extract.py).
AUTO_LOWRANK_FRACTION = 0.5
# Below this many elements CPU work on a matrix runs on one thread: LAPACK and small matmuls
# synchronise threads at every step, which made 64 x 576 SVDs 5-70x slower on a busy 2-core
# machine (and never helps at that size).
SINGLE_THREAD_ELEMENTS = 1 << 20


@contextmanager
def threads_for(mat: Tensor) -> Iterator[None]:
    """One CPU thread while working on a small CPU tensor (see SINGLE_THREAD_ELEMENTS)."""
    if mat.device.type != "cpu" or mat.numel() >= SINGLE_THREAD_ELEMENTS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def oversampled(rank: int, smallest: int) -> int:
    """How many components the randomized SVD computes to return ``rank`` good ones."""
    return min(smallest, rank + max(8, rank // 2))


def choose_method(method: str, rank: int, shape: tuple[int, int]) -> str:
    """'exact' or 'lowrank' for a matrix of ``shape``; ``method`` may be 'auto'."""
    if method not in SVD_METHODS:
        raise ValueError(f"svd method {method!r}: choose one of {', '.join(SVD_METHODS)}")
    if method != "auto":
        return method
    smallest = min(shape)
    return "lowrank" if oversampled(rank, smallest) <= smallest * AUTO_LOWRANK_FRACTION else "exact"


def as_matrix(delta: Tensor) -> Tensor:
    """A weight difference as out x in (convs flattened over in·kh·kw)."""
    return delta.reshape(delta.shape[0], -1) if delta.ndim != 2 else delta


def factorize(delta: Tensor, rank: int, *, method: str = "exact",
              seed: int = LOWRANK_SEED, niter: int = LOWRANK_NITER) -> tuple[Tensor, Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``r`` approximation of ``delta``.

    ``up`` is (out, r), ``down`` (r, in·k·k), both float32 on ``delta``'s device, r =
    min(rank, out, in·k·k). ``lowrank`` uses ``torch.svd_lowrank`` with a fixed seed, so the
    same input gives the same factors.
    """
    mat = as_matrix(delta).float()
    r = min(rank, *mat.shape)
    if not torch.any(mat):
        # the SVD of zero is arbitrary; zero factors say the same thing exactly
        return mat.new_zeros(mat.shape[0], r), mat.new_zeros(r, mat.shape[1])
    with threads_for(mat):
        if choose_method(method, r, tuple(mat.shape)) == "lowrank":
            q = oversampled(r, min(mat.shape))
            devices = [mat.device] if mat.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                u, s, v = torch.svd_lowrank(mat, q=q, niter=niter)
            return u[:, :r] * s[:r], v[:, :r].T.contiguous()
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u[:, :r] * s[:r], vh[:r].contiguous()


def quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for any size, via ``kthvalue``."""
    flat = values.reshape(-1)
    n = flat.numel()
    pos = q * (n - 1)
    lo = int(pos)
    low = flat.kthvalue(lo + 1).values
    if lo + 1 >= n:
        return low
    high = flat.kthvalue(lo + 2).values
    return low + (high - low) * (pos - lo)


def clamp_factors(up: Tensor, down: Tensor, q: float = CLAMP_QUANTILE) -> tuple[Tensor, Tensor]:
    """Both factors clipped to ± the ``q`` quantile of their concatenated values."""
    hi = quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def shaped(up: Tensor, down: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Factors of an out x in matrix in kohya's layout for a weight of ``shape``:
    linear (out, r) / (r, in); conv (out, r, 1, 1) / (r, in, kh, kw)."""
    if len(shape) == 4:
        return up.reshape(*up.shape, 1, 1), down.reshape(down.shape[0], *shape[1:])
    return up, down
