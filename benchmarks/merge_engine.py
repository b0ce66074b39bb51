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


def flat_floor(numel: int, dtype, device, repeat: int) -> tuple[float, float]:
    """(one torch.lerp over contiguous buffers of the same bytes: the memory-speed floor;
    one copy of the same bytes: the device's memory bandwidth, for scale)."""
    a = torch.randn(numel, device=device).to(dtype)
    b = torch.randn(numel, device=device).to(dtype)
    out = torch.empty_like(a)
    lerp = timed(lambda: torch.lerp(b, a, 0.3, out=out), device, repeat)
    return lerp, timed(lambda: out.copy_(a), device, repeat)


def python_loop(unet_state, device, repeat: int) -> float:
    """What a naive tool does: a*(1-r)+b*r per key, allocating every result."""
    pairs = [(v, v.clone()) for v in unet_state.values()]
    return timed(lambda: [x * (1 - 0.3) + y * 0.3 for x, y in pairs], device, repeat)


def save_and_load(pipe, arch: str, device, dtype, folder: Path) -> tuple[float, float]:
    """(UNet state dict saved and loaded back into the live UNet: a lower bound;
    the whole candidate checkpoint saved and loaded as a pipeline: what disk-based tools pay)."""
    from safetensors.torch import load_file, save_file

    from merge_backend.architectures import ARCHITECTURES
    from merge_backend.naming import to_original

    path = folder / "unet.safetensors"
    sync(device)
    start = time.perf_counter()
    save_file({k: v.detach().contiguous().cpu() for k, v in pipe.unet.state_dict().items()},
              str(path))
    pipe.unet.load_state_dict(load_file(str(path), device=str(device)))
    sync(device)
    unet_only = time.perf_counter() - start
    spec = ARCHITECTURES[arch]
    modules = {"unet": pipe.unet, "vae": pipe.vae}
    modules.update({te.name: getattr(pipe, te.diffusers_folder) for te in spec.text_encoders})
    path = folder / "candidate.safetensors"
    sync(device)
    start = time.perf_counter()
    state = {}
    for component, module in modules.items():
        config = dict(module.config) if component in ("unet", "vae") else None
        part = to_original(spec, component, module.state_dict(), config)
        state.update({k: v.detach().contiguous().cpu() for k, v in part.items()})
    save_file(state, str(path))
    reloaded = load_pipeline(path, device=device, dtype=dtype)
    sync(device)
    full = time.perf_counter() - start
    del reloaded
    return unet_only, full


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
    floor, copy = flat_floor(numel, dtype, device, args.repeat)
    nbytes = numel * dtype.itemsize
    loop = python_loop(pipe.unet.state_dict(), device, max(1, args.repeat // 2))
    with tempfile.TemporaryDirectory(dir=files[0].parent) as tmp:
        unet_only, disk = save_and_load(pipe, args.arch, device, dtype, Path(tmp))
    apply = results[("device", "fast")]
    print(f"floor (one flat lerp, same bytes): {floor * 1e3:9.2f} ms "
          f"({3 * nbytes / floor / 1e9:.0f} GB/s: two sources read, one result written)")
    print(f"copy of the same bytes:            {copy * 1e3:9.2f} ms "
          f"({2 * nbytes / copy / 1e9:.0f} GB/s)")
    print(f"per-key python a*(1-r)+b*r:        {loop * 1e3:9.2f} ms ({loop / apply:.1f}x apply)")
    print(f"save + load, UNet state dict only: {unet_only * 1e3:9.2f} ms "
          f"({unet_only / apply:.1f}x apply; a lower bound, page cache, no pipeline)")
    print(f"save + load of the candidate file: {disk * 1e3:9.2f} ms ({disk / apply:.1f}x apply; "
          "what disk-based tools pay: checkpoint written, pipeline loaded from it)")
    goal("engine_apply_vs_floor", apply / floor, 1.15)
    goal("engine_speedup_vs_save_load", disk / apply, 20.0, higher_is_better=True, fmt="{:.1f}")


if __name__ == "__main__":
    main()
