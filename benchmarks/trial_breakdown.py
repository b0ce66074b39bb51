"""Benchmark (issue 4): where a trial's time goes — apply, generation, scoring, bookkeeping.

Runs a few real trials of a study (the same code `mergesearch run` runs) on the tiny family and
at full SD1.5 size (random weights built from the default configs; on a CPU a small image and
few steps), and prints the median split. Scoring uses a tiny random CLIP plus the sanity check
(no scorer weights can be downloaded here). Goal: everything but generation and scoring <= 5%
of a trial at full size. On a GPU the defaults are a realistic trial: 4 probes of 512x512,
20 steps, fp16. ``--dry-run`` runs the tiny family alone, to check the plumbing in seconds.

    .venv/bin/python benchmarks/trial_breakdown.py [--trials 4] [--probes 4] [--size 512]
        [--steps 20] [--dtype fp16] [--device cuda] [--dry-run]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fullsize import full_size_files, goal, machine  # noqa: E402

from evaluators.testing import write_tiny_open_clip  # noqa: E402
from merge_backend.tiny import write_tiny_family  # noqa: E402
from search import run_folder as rf  # noqa: E402
from search.config import parse_config  # noqa: E402
from search.study import optimize, prepare  # noqa: E402

PHASES = ("suggest", "apply", "generate", "score", "bookkeeping")


def config(name, model1, model2, folder, clip, args, trials, config_folder=None):
    data = {
        "name": name, "models": {"model1": str(model1), "model2": str(model2)},
        "merge": {"vocabulary": "mbw", "arithmetic": "fast"},
        "probes": {"prompts": ["a lighthouse on a cliff at dawn"],
                   "seeds": list(range(1, args.probes + 1)), "steps": args.steps, "cfg": 6.0,
                   "width": args.size, "height": args.size, "batch_size": args.probes},
        "scorers": [{"kind": "clip", "model": str(clip[0]), "weights": str(clip[1])},
                    {"kind": "sanity"}],
        "warm_start": {"model1": False, "model2": False, "uniform": []},
        "trials": trials, "output": str(folder), "device": args.device, "dtype": args.dtype,
    }
    if config_folder:
        data["config_folder"] = str(config_folder)
    return parse_config(data)


def breakdown(cfg) -> dict[str, float]:
    study, ctx = prepare(cfg, log=lambda m: None)
    optimize(study, ctx, log=lambda m: None)
    rows = [t.user_attrs[rf.ATTR_TIMINGS] for t in rf.completed(study)]
    rows = rows[1:] or rows  # the first trial pays one-off warm-ups
    return {p: statistics.median(r[p] for r in rows) for p in PHASES}


def show(label: str, split: dict[str, float]) -> float:
    total = sum(split.values())
    overhead = total - split["generate"] - split["score"]
    parts = "  ".join(f"{p} {split[p] * 1e3:8.1f} ms ({split[p] / total:5.1%})" for p in PHASES)
    print(f"{label:10s} trial {total:7.3f} s: {parts}")
    return overhead / total


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--probes", type=int, default=4 if gpu else 2, help="images per trial")
    parser.add_argument("--size", type=int, default=512 if gpu else 256)
    parser.add_argument("--steps", type=int, default=20 if gpu else 4)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dry-run", action="store_true",
                        help="the tiny family only, 64x64, 2 steps, 2 trials: plumbing, no goal")
    args = parser.parse_args()
    if args.dry_run:
        args.size, args.steps, args.trials = 64, 2, 2
    print(f"machine: {machine()}; device {args.device}, dtype {args.dtype}; probes: "
          f"{args.probes} images {args.size}x{args.size}, {args.steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = write_tiny_open_clip(tmp / "clip", name="bench-clip")
        fam = write_tiny_family(tmp / "tiny", "sd1")
        tiny = breakdown(config("tiny", fam.a, fam.b, tmp / "runs", clip, args, args.trials + 1,
                                fam.config_folder))
        show("tiny", tiny)
        if args.dry_run:
            print("dry run: the goal is judged at full size only")
            return
        a, b = full_size_files("sd1", 2)
        full = breakdown(config("full", a, b, tmp / "runs", clip, args, args.trials + 1))
        share = show("full SD1.5", full)
    goal("trial_overhead_share_full_size", share, 0.05, fmt="{:.4f}")


if __name__ == "__main__":
    main()
