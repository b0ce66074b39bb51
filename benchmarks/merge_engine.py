"""Benchmark (issue 3): the in-memory engine at full SD1.5 size (random weights, fp16).

Prints, in one run: apply time (fast and comfy arithmetic, device and offload modes); the
floor — one flat torch.lerp over contiguous buffers of the same bytes; a per-key Python loop
`a*(1-r)+b*r`; a save + load of the merged checkpoint (what disk-based tools pay per trial);
the memory each mode planned and the process's peak RSS. The apply, the floor and the save +
load run interleaved, round by round (medians), so drift of the machine cancels in their
ratios. Goals: apply <= 1.15x the floor; >= 20x faster than save + load.

    .venv/bin/python benchmarks/merge_engine.py [--device cuda] [--arch sd1] [--repeat 5]

``--dry-run`` runs every job once on the tiny family instead (seconds, no goal judged): the
plumbing check ``benchmarks/gpu_check.py --dry-run`` runs on a machine without a GPU.
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
from merge_backend.dtypes import NAMES  # noqa: E402
from merge_backend.engine import MergeEngine  # noqa: E402
from merge_backend.pipeline import load_pipeline  # noqa: E402
from merge_backend.recipe import uniform_ratios  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(jobs: dict, device, repeat: int) -> dict[str, float]:
    """Median seconds of each job over ``repeat`` rounds, after one warm-up each. Every round
    runs every job once, so all of them see the same machine: on a shared VM the memory
    bandwidth drifts by half within a minute, and timing one job after the other would put
    that drift into their ratios."""
    for fn in jobs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeat):
        for name, fn in jobs.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def candidates(arch: str, files, arithmetic: str, dtype: torch.dtype):
    held = NAMES[dtype]  # sources held in the live dtype, as a study does
    base = Recipe(arch=arch, method="weighted_sum", vocabulary="mbw",
                  ratios=uniform_ratios(arch, "mbw", 0.5), arithmetic=arithmetic,
                  models={"model1": Source(str(files[0])), "model2": Source(str(files[1]))},
                  unet_dtype=held, text_encoder_dtype=held)
    flip = [0]

    def next_recipe():
        flip[0] += 1  # every block changes every time: a full apply, no skipping
        value = 0.3 if flip[0] % 2 else 0.7
        return base.replace(ratios={k: value for k in base.ratios})
    return base, next_recipe


def engine_job(pipe, files, arch, device, dtype, memory, arithmetic):
    """(engine, one full apply of a new candidate, merged parameters)."""
    base, next_recipe = candidates(arch, files, arithmetic, dtype)
    engine = MergeEngine(pipe, base, device=device, memory=memory)
    return engine, lambda: engine.apply(next_recipe()), sum(g.numel for g in engine.groups)


def floor_jobs(numel: int, dtype, device) -> tuple:
    """(one torch.lerp over contiguous buffers of the same bytes: the memory-speed floor;
    one copy of the same bytes: the device's memory bandwidth, for scale)."""
    a = torch.randn(numel, device=device).to(dtype)
    b = torch.randn(numel, device=device).to(dtype)
    out = torch.empty_like(a)
    return lambda: torch.lerp(b, a, 0.3, out=out), lambda: out.copy_(a)


def python_loop_job(unet_state):
    """What a naive tool does: a*(1-r)+b*r per key, allocating every result."""
    pairs = [(v, v.clone()) for v in unet_state.values()]
    return lambda: [x * (1 - 0.3) + y * 0.3 for x, y in pairs]


def save_load_jobs(pipe, arch: str, device, dtype, folder: Path, config_folder=None) -> tuple:
    """(the UNet state dict saved and loaded back into the live UNet: a lower bound;
    the whole candidate checkpoint saved and loaded as a pipeline: what disk-based tools pay
    per trial)."""
    from safetensors.torch import load_file, save_file

    from merge_backend.architectures import ARCHITECTURES
    from merge_backend.naming import to_original

    def unet_only() -> None:
        path = folder / "unet.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in pipe.unet.state_dict().items()},
                  str(path))
        pipe.unet.load_state_dict(load_file(str(path), device=str(device)))

    spec = ARCHITECTURES[arch]
    modules = {"unet": pipe.unet, "vae": pipe.vae}
    modules.update({te.name: getattr(pipe, te.folder) for te in spec.text_encoders})

    def full() -> None:
        path = folder / "candidate.safetensors"
        state = {}
        for component, module in modules.items():
            config = dict(module.config) if component in ("unet", "vae") else None
            part = to_original(spec, component, module.state_dict(), config)
            state.update({k: v.detach().contiguous().cpu() for k, v in part.items()})
        save_file(state, str(path))
        reloaded = load_pipeline(path, device=device, dtype=dtype, config_folder=config_folder)
        del reloaded

    return unet_only, full


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sd1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true",
                        help="the tiny family, one round: plumbing only, no goal judged")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.dry_run:
            from merge_backend.tiny import write_tiny_family

            fam = write_tiny_family(Path(tmp), args.arch)
            args.repeat, files, config_folder, size = 1, [fam.a, fam.b], fam.config_folder, "tiny"
        else:
            files, config_folder, size = full_size_files(args.arch, 2), None, "full size"
        run(args, files, config_folder, size)


def run(args, files: list[Path], config_folder, size: str) -> None:
    device = torch.device(args.device)
    dtype = torch.float16
    print(f"machine: {machine()}; device {device}; {args.arch} {size}, fp16 sources and live")
    pipe = load_pipeline(files[0], device=device, dtype=dtype, config_folder=config_folder)
    for memory, arithmetic in (("device", "comfy"), ("offload", "fast")):
        engine, job, numel = engine_job(pipe, files, args.arch, device, dtype, memory, arithmetic)
        seconds = interleaved({"apply": job}, device, args.repeat)["apply"]
        print(f"apply {memory:7s} {arithmetic:5s}: {seconds * 1e3:9.2f} ms  "
              f"({numel / 1e6:.0f} M params; {engine.memory.describe()})")
        del engine, job
    engine, job, numel = engine_job(pipe, files, args.arch, device, dtype, "device", "fast")
    nbytes = numel * dtype.itemsize

    def memory_speed() -> dict[str, float]:
        lerp, copy = floor_jobs(numel, dtype, device)
        return interleaved({"apply": job, "floor": lerp, "copy": copy}, device, args.repeat)

    # Memory-speed jobs, then the disk round trips, then the memory-speed jobs again: a save +
    # load leaves gigabytes of dirty page cache whose write-back would slow an apply timed
    # right after it, and the two passes around it bracket the machine's drift.
    before = memory_speed()
    with tempfile.TemporaryDirectory(dir=files[0].parent) as tmp:
        unet_only, full = save_load_jobs(pipe, args.arch, device, dtype, Path(tmp),
                                         config_folder)
        disk_times = interleaved({"unet_only": unet_only, "disk": full}, device, args.repeat)
    after = memory_speed()
    t = {k: (before[k] + after[k]) / 2 for k in before} | disk_times
    loop = interleaved({"loop": python_loop_job(pipe.unet.state_dict())}, device,
                       max(1, args.repeat // 2))["loop"]
    apply, floor = t["apply"], t["floor"]
    print(f"apply device  fast : {apply * 1e3:9.2f} ms  ({numel / 1e6:.0f} M params; "
          f"{engine.memory.describe()}; peak RSS {peak_rss_gib():.2f} GiB)")
    print(f"floor (one flat lerp, same bytes): {floor * 1e3:9.2f} ms "
          f"({3 * nbytes / floor / 1e9:.0f} GB/s: two sources read, one result written)")
    print(f"copy of the same bytes:            {t['copy'] * 1e3:9.2f} ms "
          f"({2 * nbytes / t['copy'] / 1e9:.0f} GB/s)")
    print(f"per-key python a*(1-r)+b*r:        {loop * 1e3:9.2f} ms ({loop / apply:.1f}x apply)")
    print(f"save + load, UNet state dict only: {t['unet_only'] * 1e3:9.2f} ms "
          f"({t['unet_only'] / apply:.1f}x apply; a lower bound, page cache, no pipeline)")
    print(f"save + load of the candidate file: {t['disk'] * 1e3:9.2f} ms "
          f"({t['disk'] / apply:.1f}x apply; what disk-based tools pay: checkpoint written, "
          "pipeline loaded from it)")
    if args.dry_run:
        print("dry run: goals are judged at full size only")
        return
    disk = t["disk"]
    goal("engine_apply_vs_floor", apply / floor, 1.15)
    goal("engine_speedup_vs_save_load", disk / apply, 20.0, higher_is_better=True, fmt="{:.1f}")


if __name__ == "__main__":
    main()
