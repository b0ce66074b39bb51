"""Benchmark (issue 3): the in-memory engine at full SD1.5 size (random weights, fp16).

Prints, in one run: apply time (fast and comfy arithmetic, device and offload modes); the
floor — one flat torch.lerp over contiguous buffers of the same bytes; a per-key Python loop
`a*(1-r)+b*r`; a save + load of the merged checkpoint (what disk-based tools pay per trial);
the memory each mode planned and the process's peak RSS. Goals: apply <= 1.15x the floor;
>= 20x faster than save + load.

    .venv/bin/python benchmarks/merge_engine.py [--device cuda] [--arch sd1] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fullsize import full_size_files, goal, machine  # noqa: E402

from merge_backend import Recipe, Source  # noqa: E402
from merge_backend.engine import MergeEngine  # noqa: E402
from merge_backend.pipeline import load_pipeline  # noqa: E402
from merge_backend.recipe import uniform_ratios  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def candidates(arch: str, files, arithmetic: str):
    base = Recipe(arch=arch, method="weighted_sum", vocabulary="mbw",
                  ratios=uniform_ratios(arch, "mbw", 0.5), arithmetic=arithmetic,
                  models={"model1": Source(str(files[0])), "model2": Source(str(files[1]))})
    flip = [0]

    def next_recipe():
        flip[0] += 1  # every block changes every time: a full apply, no skipping
        value = 0.3 if flip[0] % 2 else 0.7
        return base.replace(ratios={k: value for k in base.ratios})
    return base, next_recipe


def bench_engine(pipe, files, arch, device, dtype, memory, arithmetic, repeat):
    base, next_recipe = candidates(arch, files, arithmetic)
    engine = MergeEngine(pipe, base, device=device, memory=memory, source_dtype=dtype)
    seconds = timed(lambda: engine.apply(next_recipe()), device, repeat)
    numel = sum(g.numel for g in engine.groups)
    return engine, seconds, numel


def floor_and_loop(numel: int, dtype, device, repeat: int, unet_state) -> tuple[float, float]:
    a = torch.randn(numel, device=device).to(dtype)
    b = torch.randn(numel, device=device).to(dtype)
    out = torch.empty_like(a)
    floor = timed(lambda: torch.lerp(b, a, 0.3, out=out), device, repeat)
    del a, b, out
    pairs = [(v, v.clone()) for v in unet_state.values()]

    def loop():
        return {i: a * (1 - 0.3) + b * 0.3 for i, (a, b) in enumerate(pairs)}
    python_loop = timed(loop, device, max(1, repeat // 2))
    del pairs
    return floor, python_loop


def save_and_load(pipe, device, folder: Path) -> float:
    from safetensors.torch import load_file, save_file

    path = folder / "candidate.safetensors"
    state = {k: v.detach() for k, v in pipe.unet.state_dict().items()}
    sync(device)
    start = time.perf_counter()
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(path))
    loaded = load_file(str(path), device=str(device))
    pipe.unet.load_state_dict(loaded)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sd1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16
    files = full_size_files(args.arch, 2)
    print(f"machine: {machine()}; device {device}; {args.arch} full size, fp16 sources and live")
    pipe = load_pipeline(files[0], device=device, dtype=dtype)
    results = {}
    for memory, arithmetic in (("device", "fast"), ("device", "comfy"), ("offload", "fast")):
        engine, seconds, numel = bench_engine(pipe, files, args.arch, device, dtype, memory,
                                              arithmetic, args.repeat)
        results[(memory, arithmetic)] = seconds
        print(f"apply {memory:7s} {arithmetic:5s}: {seconds * 1e3:9.2f} ms  "
              f"({numel / 1e6:.0f} M params; {engine.memory.describe()}; "
              f"peak RSS so far {peak_rss_gib():.2f} GiB)")
        del engine
    floor, loop = floor_and_loop(numel, dtype, device, args.repeat, pipe.unet.state_dict())
    with tempfile.TemporaryDirectory(dir=files[0].parent) as tmp:
        disk = save_and_load(pipe, device, Path(tmp))
    apply = results[("device", "fast")]
    print(f"floor (one flat lerp, same bytes): {floor * 1e3:9.2f} ms")
    print(f"per-key python a*(1-r)+b*r:        {loop * 1e3:9.2f} ms ({loop / apply:.1f}x apply)")
    print(f"save + load of the candidate:      {disk * 1e3:9.2f} ms ({disk / apply:.1f}x apply)")
    goal("engine_apply_vs_floor", apply / floor, 1.15)
    goal("engine_speedup_vs_save_load", disk / apply, 20.0, higher_is_better=True, fmt="{:.1f}")


if __name__ == "__main__":
    main()
