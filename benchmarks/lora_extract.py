"""Benchmark (issues 7, 13): LoRA extraction at full UNet size against ComfyUI's algorithm.

For every LoRA-able UNet layer (the Linear / Conv2d weights of diffusers' UNet2DConditionModel
with the SD1.5 or SDXL config, built on meta), a difference is drawn from a fixed seed:
``finetune`` = a rank-64 part with a 1/i singular-value decay plus 5 % (of the energy) of
i.i.d. noise; ``flat`` = i.i.d. noise only (the slowest-decaying spectrum there is: the worst
case for randomized SVD). Each layer is factorized

- as ComfyUI's "Extract and Save Lora" does (float32 SVD, U·diag(S) / Vh truncated, both
  clamped at the 0.99 quantile of their signed values, fp16). Its time is the thin SVD's
  (LAPACK gesdd): a lower bound, since ComfyUI asks for the full SVD;
- by mergesearch's default (``--svd auto`` + its clamp, fp16), and by ``lowrank``.

The exact SVD of every layer takes minutes, so times are measured on one layer of each distinct
shape and the full-UNet time is the count-weighted sum (the time depends on the shape and the
spectrum); the default is also run on every layer at one rank to check that estimate. Errors
are relative Frobenius errors per layer, of what the file holds; the goals are per layer.

    .venv/bin/python benchmarks/lora_extract.py [--arch sd1|sdxl] [--spectrum finetune|flat]
        [--ranks 8 32] [--threads 1] [--quick]
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
    clamp_factors,
    factorize,
    factorize_with_method,
    threads_for,
)

SIGNAL_RANK = 64
NOISE_SHARE = 0.05
QUANTILE = 0.99


def unet_layers(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, weight shape) of every Linear / Conv2d of the full-size UNet, built on meta."""
    from merge_backend.architectures import ARCHITECTURES
    from merge_backend.pipeline import build_module
    from merge_backend.pipeline_configs import config_files

    with torch.device("meta"):
        unet = build_module("unet", config_files(arch, "full")["unet/config.json"],
                            arch=ARCHITECTURES[arch])
    return [(name, tuple(m.weight.shape)) for name, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def make_delta(shape: tuple[int, ...], seed: int, spectrum: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m, n = matrix_shape(shape)
    if spectrum == "flat":
        return torch.randn(m, n, generator=gen)
    k = min(SIGNAL_RANK, m, n)
    sigma = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    a = torch.randn(m, k, generator=gen) / math.sqrt(m)
    b = torch.randn(k, n, generator=gen) / math.sqrt(n)
    signal = (a * sigma) @ b
    noise = torch.randn(m, n, generator=gen)
    noise *= math.sqrt(NOISE_SHARE / (1 - NOISE_SHARE)) * signal.norm() / noise.norm()
    return signal + noise


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def rel_error(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||delta - up @ down|| / ||delta||, in float64 (float32 sums blur differences of 1e-5)."""
    with threads_for(delta):
        d = delta.double()
        return ((d - up.double() @ down.double()).norm() / d.norm()).item()


def comfy_clamp(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's clamp: ± the 0.99 quantile of the signed values (kthvalue: any size)."""
    from merge_backend.lora.svd import quantile

    hi = quantile(torch.cat([up.flatten(), down.flatten()]), QUANTILE)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def measure_shape(shape, seed: int, ranks, spectrum: str) -> dict:
    """One layer: ComfyUI (one SVD serves every rank), the default and lowrank per rank."""
    delta = as_matrix(make_delta(shape, seed, spectrum))
    with threads_for(delta):
        (u, s, vh), t_svd = timed(lambda: torch.linalg.svd(delta, full_matrices=False))
        sigma_sq = torch.linalg.svdvals(delta.double()).pow(2)  # the reference tail, float64
    out: dict = {}
    for r in ranks:
        rr = min(r, *delta.shape)
        tail = math.sqrt(sigma_sq[rr:].sum().item() / sigma_sq.sum().item())
        (cu, cd), t_clamp = timed(lambda rr=rr: comfy_clamp(u[:, :rr] * s[:rr], vh[:rr]))
        comfy = rel_error(delta, cu.half(), cd.half())
        (au, ad, how), t_auto = timed(lambda rr=rr: factorize_with_method(delta, rr))
        (ku, kd), t_clamp2 = timed(lambda au=au, ad=ad: clamp_factors(au, ad))
        (lu, ld), t_low = timed(lambda rr=rr: factorize(delta, rr, method="lowrank"))
        out[r] = {"tail": tail, "comfy": (t_svd + t_clamp, comfy),
                  "auto": (t_auto + t_clamp2, rel_error(delta, ku.half(), kd.half())),
                  "auto_unclamped": rel_error(delta, au, ad), "auto_method": how,
                  "lowrank": (t_low, rel_error(delta, lu, ld))}
    return out


def full_run(layers, rank: int, spectrum: str) -> float:
    start = time.perf_counter()
    for i, (_, shape) in enumerate(layers):
        delta = make_delta(shape, i, spectrum)
        clamp_factors(*factorize(delta, rank))
    return time.perf_counter() - start


def report(rows: dict, counts: dict, ranks, label: str) -> dict:
    summary = {}
    print(f"\nrank | {label}: comfyui  default  lowrank | per layer: default/comfyui worst "
          "| default/tail-1 worst | lowrank/tail-1 worst | default used")
    for r in ranks:
        t = {"comfy": 0.0, "auto": 0.0, "lowrank": 0.0}
        used: dict[str, int] = {}
        vs_comfy, auto_gap, low_gap = 0.0, 0.0, 0.0
        for shape, row in rows.items():
            n, x = counts[shape], row[r]
            for k in t:
                t[k] += n * x[k][0]
            used[x["auto_method"]] = used.get(x["auto_method"], 0) + n
            vs_comfy = max(vs_comfy, x["auto"][1] / x["comfy"][1])
            if x["tail"] > 1e-6:  # rank r covering the whole matrix leaves no tail
                auto_gap = max(auto_gap, x["auto_unclamped"] / x["tail"] - 1)
                low_gap = max(low_gap, x["lowrank"][1] / x["tail"] - 1)
        print(f"{r:4d} | {t['comfy']:17.1f} {t['auto']:8.1f} {t['lowrank']:8.1f} | "
              f"{vs_comfy:29.4f} | {auto_gap:+20.1e} | {low_gap:+20.1e} | {used}")
        summary[r] = {**t, "vs_comfy": vs_comfy, "auto_gap": auto_gap, "low_gap": low_gap}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=("sd1", "sdxl"), default="sd1")
    parser.add_argument("--spectrum", choices=("finetune", "flat"), default="finetune")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a busy 2-core machine two threads made "
                             "LAPACK 2-6x slower and the timings erratic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    layers = unet_layers(args.arch)
    print(f"{args.arch} UNet: {len(layers)} LoRA-able layers, "
          f"{sum(math.prod(s) for _, s in layers) / 1e6:.0f} M weights; spectrum {args.spectrum}")
    shapes: dict[tuple[int, int], tuple[int, ...]] = {}
    counts: dict[tuple[int, int], int] = {}
    for _, shape in layers:
        key = matrix_shape(shape)
        shapes.setdefault(key, shape)
        counts[key] = counts.get(key, 0) + 1
    if args.quick:
        shapes = {k: v for k, v in shapes.items() if k[0] * k[1] <= 1280 * 2560}
    rows = {}
    for i, (key, shape) in enumerate(sorted(shapes.items(), key=lambda kv: kv[0][0] * kv[0][1])):
        t0 = time.perf_counter()
        rows[key] = measure_shape(shape, 1000 + i, args.ranks, args.spectrum)
        print(f"{key[0]:5d} x {key[1]:5d} (x{counts[key]:2d}) measured in "
              f"{time.perf_counter() - t0:5.1f} s", flush=True)
    label = "measured shapes s" if args.quick else "est. full UNet s"
    summary = report(rows, counts, args.ranks, label)
    check = args.ranks[-1]
    if not args.quick:
        measured = full_run(layers, check, args.spectrum)
        print(f"default, rank {check}, every layer, measured: {measured:.1f} s "
              f"(estimate {summary[check]['auto']:.1f} s)")
    print(f"total benchmark time {time.perf_counter() - start:.0f} s")
    for r in args.ranks:
        goal(f"default_rank{r}_worst_layer_error_vs_comfyui", summary[r]["vs_comfy"], 1.0,
             fmt="{:.4f}")
        goal(f"default_rank{r}_worst_layer_error_over_svd_tail_minus_1", summary[r]["auto_gap"],
             1e-5, fmt="{:.1e}")
        goal(f"default_rank{r}_time_vs_comfyui", summary[r]["auto"] / summary[r]["comfy"], 0.25,
             fmt="{:.3f}")


if __name__ == "__main__":
    main()
