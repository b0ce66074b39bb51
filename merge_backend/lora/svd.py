"""Low-rank factors of a weight difference (the best rank-r approximation) and the clamp.

``factorize(delta, rank)`` returns ``up = U·diag(S)`` and ``down = Vh`` of the top
``r = min(rank, out, in)`` singular triplets in float32 (a 3x3 conv is flattened to out x in·9
first), the factors ComfyUI's "Extract and Save Lora" and kohya's extractor write. Methods:

- ``exact``: the top-r singular subspace from the eigendecomposition of the Gram matrix
  (``Δ·Δᵀ`` on the smaller side) in float64 — the exact truncated SVD to float32 rounding, 4-10x
  faster than LAPACK's full SVD of the same matrix;
- ``lowrank``: ``torch.svd_lowrank`` (randomized, 4 power iterations, fixed seed): fastest, and
  up to ~0.5% worse per layer where the singular values decay slowly;
- ``auto`` (default): randomized subspace iteration that keeps iterating until the spectrum it
  sees says the result is within ~1e-6 of exact, or takes ``exact`` where that would cost more
  (small matrices, flat spectra). Its errors are the exact SVD's.

``clamp_factors`` clips both factors at ± a quantile (ComfyUI's and kohya's: 0.99) of the
magnitudes of their values. ComfyUI and kohya take the quantile of the *signed* values, which
depends on the sign the SVD routine happens to give each singular pair (the same layer's clamped
error moved by up to 66% between sign choices on the tiny family); the magnitudes' quantile is
the same for every sign choice and never below the signed one, so it never clips more than
ComfyUI does.

``DEFAULT_CLAMP`` is the one default of ``lora extract``, ``lora add --rank`` and
``export --to lora``: no clamp. The truncated SVD is already the best rank-r approximation
(Eckart-Young), so a clamp can only add error, and it adds the most where users extract most:
a LoRA baked into a fine-tune, extracted at a rank at or above its own, comes back whole only
unclamped (measured by ``benchmarks/lora_extract_defaults.py``; figures in
``benchmarks/RESULTS.md``, the decision in the README).

Example:
    >>> import torch
    >>> d = torch.randn(64, 32) @ torch.randn(32, 48)
    >>> up, down = factorize(d, 32, method="exact")
    >>> bool(torch.allclose(up @ down, d, atol=1e-3))
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

SVD_METHODS = ("auto", "exact", "lowrank")
CLAMP_QUANTILE = 0.99  # ComfyUI's "Extract and Save Lora" and kohya's extractor
DEFAULT_CLAMP: float | None = None  # no clamp (see the module docstring for why)
DEFAULT_FACTOR_DTYPE = "fp16"  # stored factors: rounding costs ~3e-4 relative (RESULTS.md)
LOWRANK_NITER = 4
LOWRANK_SEED = 0
# auto: power iterations until (σ_q / σ_r)^(2·iterations) <= this (q = r + oversampling): on
# SD-shaped differences with 1/i^a spectra the randomized error was then within 1e-6 of the
# exact SVD's (benchmarks/lora_extract.py); 4 iterations first, then as many as that needs.
AUTO_TARGET = 1e-3
AUTO_FIRST_ITERATIONS = 4
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
    return min(smallest, rank + max(16, rank))


def as_matrix(delta: Tensor) -> Tensor:
    """A weight difference as out x in (convs flattened over in·kh·kw)."""
    return delta.reshape(delta.shape[0], -1) if delta.ndim != 2 else delta


def _exact_cost(m: int, n: int) -> float:
    """The cost of ``_exact`` (Gram product and eigendecomposition in float64) in the units of
    ``_iteration_cost``; calibrated on 2 CPU cores, where it ran 40 iterations' time on a
    1280 x 11520 matrix at q = 24 and 175 on 1280 x 1280."""
    small, large = min(m, n), max(m, n)
    return 2 * small * small * large + 10 * small**3


def _iteration_cost(m: int, n: int, q: int) -> float:
    """Flops of one power iteration (two products and two QRs) on q columns."""
    return 4 * m * n * q + 4 * (m + n) * q * q


def factorize(delta: Tensor, rank: int, *, method: str = "auto",
              seed: int = LOWRANK_SEED) -> tuple[Tensor, Tensor]:
    """``(up, down)`` with ``up @ down`` the best rank-``r`` approximation of ``delta``.

    ``up`` is (out, r), ``down`` (r, in·k·k), both float32 on ``delta``'s device, r =
    min(rank, out, in·k·k). Randomized methods use a fixed seed: the same input gives the same
    factors.
    """
    up, down, _ = factorize_with_method(delta, rank, method=method, seed=seed)
    return up, down


def factorize_with_method(delta: Tensor, rank: int, *, method: str = "auto",
                          seed: int = LOWRANK_SEED) -> tuple[Tensor, Tensor, str]:
    """``factorize``, and which method produced the factors ("exact", "lowrank", or "zero"
    for a difference that is zero everywhere)."""
    if method not in SVD_METHODS:
        raise ValueError(f"svd method {method!r}: choose one of {', '.join(SVD_METHODS)}")
    mat = as_matrix(delta).float()
    r = min(rank, *mat.shape)
    if not torch.any(mat):
        # the SVD of zero is arbitrary; zero factors say the same thing exactly
        return mat.new_zeros(mat.shape[0], r), mat.new_zeros(r, mat.shape[1]), "zero"
    with threads_for(mat):
        if method == "lowrank":
            return (*_lowrank(mat, r, seed), "lowrank")
        if method == "auto":
            found = _adaptive(mat, r, seed)
            if found is not None:
                return (*found, "lowrank")
        return (*_exact(mat, r), "exact")


def _exact(mat: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """The top-r singular triplets from the Gram matrix of the smaller side, in float64."""
    a = mat.double()
    if mat.shape[0] <= mat.shape[1]:
        _, vectors = torch.linalg.eigh(a @ a.T)
        u = vectors[:, -r:].flip(1)  # top r left singular vectors
        sv = u.T @ a  # rows s_i·v_i
        s = sv.norm(dim=1)
        down = sv / torch.where(s > 0, s, 1.0)[:, None]
        return (u * s).float(), down.float()
    _, vectors = torch.linalg.eigh(a.T @ a)
    v = vectors[:, -r:].flip(1)  # top r right singular vectors
    return (a @ v).float(), v.T.float().contiguous()


def _lowrank(mat: Tensor, r: int, seed: int) -> tuple[Tensor, Tensor]:
    q = min(min(mat.shape), r + max(8, r // 2))
    devices = [mat.device] if mat.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(mat, q=q, niter=LOWRANK_NITER)
    return u[:, :r] * s[:r], v[:, :r].T.contiguous()


def _adaptive(mat: Tensor, r: int, seed: int) -> tuple[Tensor, Tensor] | None:
    """Randomized subspace iteration run to exact-SVD accuracy, or None where the exact
    method is cheaper (small matrices, slowly decaying spectra)."""
    m, n = mat.shape
    q = oversampled(r, min(m, n))
    budget = _exact_cost(m, n) / _iteration_cost(m, n, q)
    if q >= min(m, n) or budget <= AUTO_FIRST_ITERATIONS + 1:
        return None
    generator = torch.Generator(device=mat.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=generator, device=mat.device)
    basis = torch.linalg.qr(mat @ omega).Q
    done, needed = 0, AUTO_FIRST_ITERATIONS
    while True:
        while done < needed:
            basis = torch.linalg.qr(mat @ torch.linalg.qr(mat.T @ basis).Q).Q
            done += 1
        projected = basis.T @ mat  # q x n
        u, s, vh = torch.linalg.svd(projected, full_matrices=False)
        ratio = (s[q - 1] / s[r - 1]).item() if s[r - 1] > 0 else 0.0
        if ratio >= 1.0:  # flat where it matters: iterating would not separate them
            return None
        needed = 0 if ratio <= 0 else math.ceil(math.log(AUTO_TARGET) / (2 * math.log(ratio)))
        if done >= needed:
            return (basis @ u[:, :r]) * s[:r], vh[:r].contiguous()
        # first look: leave room for the estimate to grow as the subspace converges
        if needed > (budget / 2 if done == AUTO_FIRST_ITERATIONS else budget):
            return None


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


def check_clamp(clamp: float | None, error: type[ValueError] = ValueError) -> None:
    """A clamp is None (off) or a quantile in (0, 1]; raise ``error`` naming --clamp else."""
    if clamp is not None and (isinstance(clamp, bool) or not 0 < clamp <= 1):
        raise error(f"--clamp {clamp!r}: give a quantile in (0, 1] (ComfyUI and kohya use "
                    f"{CLAMP_QUANTILE}), or --no-clamp")


def clamp_factors(up: Tensor, down: Tensor, q: float = CLAMP_QUANTILE) -> tuple[Tensor, Tensor]:
    """Both factors clipped to ± the ``q`` quantile of the magnitudes of their values (see
    the module docstring for why magnitudes and not ComfyUI's signed values)."""
    hi = quantile(torch.cat([up.reshape(-1), down.reshape(-1)]).abs(), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def shaped(up: Tensor, down: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Factors of an out x in matrix in kohya's layout for a weight of ``shape``:
    linear (out, r) / (r, in); conv (out, r, 1, 1) / (r, in, kh, kw)."""
    if len(shape) == 4:
        return up.reshape(*up.shape, 1, 1), down.reshape(down.shape[0], *shape[1:])
    return up, down
