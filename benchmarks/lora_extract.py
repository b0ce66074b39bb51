"""Benchmark (issue 7): LoRA extraction at full SD1.5 UNet size, exact vs low-rank SVD.

The difference model1 - model2 of every LoRA-able UNet layer (the 282 Linear / Conv2d weights
of diffusers' default UNet2DConditionModel, which is SD1.5's) is a fine-tune-like
perturbation: a rank-64 part with a 1/i singular-value decay plus 5 % (of the energy) of
i.i.d. noise, drawn per layer from a fixed seed. Each layer is factorized exactly as
``extract_lora`` does it (float32 SVD, 0.99-quantile clamp).

The exact SVD of every layer takes tens of minutes on 2 cores, so timings are measured on one
layer of each of the 33 distinct shapes and the full-UNet time is the count-weighted sum (SVD
time depends only on the shape); the low-rank path at rank 32 is also run on all 282 layers to
check that estimate. Errors are over the 33 measured layers (relative Frobenius, unclamped vs
the SVD tail sqrt(sum of dropped sigma^2) / ||delta||, and clamped as written).

    .venv/bin/python benchmarks/lora_extract.py [--ranks 8 32 128] [--device cpu|cuda] [--quick]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _fullsize import goal, machine  # noqa: E402

from merge_backend.lora.svd import (  # noqa: E402
    as_matrix,
    choose_method,
    clamp_factors,
    factorize,
    threads_for,
)

SIGNAL_RANK = 64
NOISE_SHARE = 0.05


def unet_layers() -> list[tuple[str, tuple[int, ...]]]:
    """(name, weight shape) of every Linear / Conv2d of the SD1.5 UNet, built on meta."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel()
    return [(name, tuple(m.weight.shape)) for name, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def make_delta(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """A fine-tune-like difference: rank-64 part with 1/i decay + 5 % noise energy."""
    gen = torch.Generator().manual_seed(seed)
    m, n = matrix_shape(shape)
    k = min(SIGNAL_RANK, m, n)
    sigma = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    a = torch.randn(m, k, generator=gen) / math.sqrt(m)
    b = torch.randn(k, n, generator=gen) / math.sqrt(n)
    signal = (a * sigma) @ b
    noise = torch.randn(m, n, generator=gen)
    noise *= math.sqrt(NOISE_SHARE / (1 - NOISE_SHARE)) * signal.norm() / noise.norm()
    return (signal + noise).to(device)


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def rel_error(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    with threads_for(delta):
        return ((delta - up @ down).norm() / delta.norm()).item()


def measure_shape(shape, seed, ranks, device) -> dict:
    """Times and errors of one layer: one exact SVD serves every rank; low-rank per rank.

    Times include the 0.99-quantile clamp, as in ``extract_lora``; errors are unclamped
    (to compare with the SVD tail) and clamped (what the file holds).
    """
    delta = as_matrix(make_delta(shape, seed, device))
    out: dict = {"exact": {}, "lowrank": {}, "tail": {}, "clamped": {}}
    full = min(delta.shape)
    (u_s, vh), t_svd = timed(lambda: factorize(delta, full, method="exact"), device)
    sigma_sq = u_s.double().pow(2).sum(dim=0)  # columns of U·diag(S) have norm S
    for r in ranks:
        rr = min(r, full)
        out["tail"][r] = math.sqrt(sigma_sq[rr:].sum().item() / sigma_sq.sum().item())
        up, down = u_s[:, :rr], vh[:rr]
        (cu, cd), t_clamp = timed(lambda up=up, down=down: clamp_factors(up, down), device)
        out["exact"][r] = (t_svd + t_clamp, rel_error(delta, up, down))
        out["clamped"][r] = rel_error(delta, cu, cd)
        (lu, ld), t_low = timed(lambda rr=rr: factorize(delta, rr, method="lowrank"), device)
        _, t_clamp = timed(lambda lu=lu, ld=ld: clamp_factors(lu, ld), device)
        out["lowrank"][r] = (t_low + t_clamp, rel_error(delta, lu, ld))
    return out


def full_lowrank(layers, rank: int, device) -> float:
    start = time.perf_counter()
    for i, (_, shape) in enumerate(layers):
        delta = make_delta(shape, i, device)
        r = min(rank, *matrix_shape(shape))
        clamp_factors(*factorize(delta, r, method="lowrank"))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def report(rows: dict, counts: dict, ranks, device: torch.device, label: str) -> dict:
    """Per rank: estimated full-UNet seconds (exact / lowrank / auto) and errors vs the tail."""
    summary = {}
    print(f"\n[{device}] rank | {label}: exact  lowrank  auto | err exact  lowrank  "
          "tail  clamped | lowrank err / tail - 1")
    for r in ranks:
        t = {"exact": 0.0, "lowrank": 0.0, "auto": 0.0}
        sq = {"exact": 0.0, "lowrank": 0.0, "tail": 0.0, "clamped": 0.0}
        for shape, row in rows.items():
            n = counts[shape]
            t["exact"] += n * row["exact"][r][0]
            t["lowrank"] += n * row["lowrank"][r][0]
            rr = min(r, *shape)
            t["auto"] += n * row[choose_method("auto", rr, shape)][r][0]
            sq["exact"] += row["exact"][r][1] ** 2
            sq["lowrank"] += row["lowrank"][r][1] ** 2
            sq["tail"] += row["tail"][r] ** 2
            sq["clamped"] += row["clamped"][r] ** 2
        err = {k: math.sqrt(v / len(rows)) for k, v in sq.items()}  # RMS over layers
        # layers whose rank r covers the whole matrix have no tail (both errors ~0)
        gap = max((row["lowrank"][r][1] / row["tail"][r] - 1 for row in rows.values()
                   if row["tail"][r] > 1e-6), default=0.0)
        print(f"[{device}] {r:4d} | {t['exact']:20.1f} {t['lowrank']:8.1f} {t['auto']:6.1f} | "
              f"{err['exact']:9.4f} {err['lowrank']:8.4f} {err['tail']:6.4f} {err['clamped']:8.4f}"
              f" | worst layer {gap:+.4f}")
        summary[r] = {**t, **{f"err_{k}": v for k, v in err.items()}, "gap": gap,
                      "best": min(t["exact"], t["lowrank"])}
    return summary


def run_device(device: torch.device, layers, ranks, quick: bool) -> dict:
    shapes: dict[tuple[int, int], tuple[int, ...]] = {}
    counts: dict[tuple[int, int], int] = {}
    for _, shape in layers:
        key = matrix_shape(shape)
        shapes.setdefault(key, shape)
        counts[key] = counts.get(key, 0) + 1
    if quick:
        shapes = {k: v for k, v in shapes.items() if k[0] * k[1] <= 1280 * 2560}
    rows = {}
    for i, (key, shape) in enumerate(sorted(shapes.items(), key=lambda kv: kv[0][0] * kv[0][1])):
        start = time.perf_counter()
        rows[key] = measure_shape(shape, 1000 + i, ranks, device)
        print(f"[{device}] {key[0]:5d} x {key[1]:5d} (x{counts[key]:2d}) measured in "
              f"{time.perf_counter() - start:5.1f} s", flush=True)
    label = "measured shapes s" if quick else "est. full UNet s"
    return report(rows, {k: counts[k] for k in rows}, ranks, device, label)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--device", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a busy 2-core machine two threads made "
                             "LAPACK 2-6x slower and the timings erratic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    layers = unet_layers()
    print(f"SD1.5 UNet: {len(layers)} LoRA-able layers, "
          f"{sum(math.prod(s) for _, s in layers) / 1e6:.0f} M weights; difference = rank-"
          f"{SIGNAL_RANK} 1/i spectrum + {NOISE_SHARE:.0%} noise energy")
    print("exact SVD timed on one layer per distinct shape, full-UNet time = count-weighted sum")
    devices = [torch.device(args.device)] if args.device else [torch.device("cpu")]
    if args.device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    results = {d.type: run_device(d, layers, args.ranks, args.quick) for d in devices}
    cpu = results[devices[0].type]
    check_rank = 32 if 32 in args.ranks else args.ranks[0]
    if not args.quick:
        measured = full_lowrank(layers, check_rank, devices[0])
        print(f"[{devices[0]}] low-rank rank {check_rank} over all {len(layers)} layers, measured: "
              f"{measured:.1f} s (estimate {cpu[check_rank]['lowrank']:.1f} s)")
    if "cuda" not in results:
        print("GPU: none on this machine; run with --device cuda where there is one")
    print(f"total benchmark time {time.perf_counter() - start:.0f} s")
    r = check_rank
    goal(f"lowrank_rank{r}_time_vs_exact", cpu[r]["lowrank"] / cpu[r]["exact"], 1.0)
    for rank in args.ranks:
        goal(f"lowrank_rank{rank}_worst_layer_error_over_svd_tail", cpu[rank]["gap"], 0.01,
             fmt="{:.4f}")
        goal(f"auto_rank{rank}_time_vs_faster_method", cpu[rank]["auto"] / cpu[rank]["best"], 1.1)
    goal("exact_error_minus_svd_tail", abs(cpu[r]["err_exact"] - cpu[r]["err_tail"]), 1e-4,
         fmt="{:.2e}")


if __name__ == "__main__":
    main()
