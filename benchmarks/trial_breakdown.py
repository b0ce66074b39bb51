"""Benchmark (issue 4): where a trial's time goes — apply, generation, scoring, bookkeeping.

Runs a few real trials of a study (the same code `mergesearch run` runs) on the tiny family and
at full SD1.5 size (random weights built from the default configs; on a CPU a small image and
few steps), and prints the median split. Scoring uses a tiny random CLIP plus the sanity check
(no scorer weights can be downloaded here). Goal: at full size, the card spends <= 5% of a
trial's wall time (between the ends of two consecutive trials) not drawing or scoring. The
``bookkeeping`` phase (pictures, note, attributes) runs on the storage lane while the next
trial draws, so it counts only where it holds the drawing up; the phases' shares of the wall
time can therefore add up to more than 100%. On a GPU the defaults are a realistic trial: 4 probes of 512x512,
20 steps, fp16. ``--dry-run`` runs the tiny family alone, to check the plumbing in seconds.

    .venv/bin/python benchmarks/trial_breakdown.py [--trials 4] [--probes 4] [--size 512]
        [--steps 20] [--dtype fp16] [--device cuda] [--dry-run]
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
        "propose_ahead": not args.in_turn,
    }
    if config_folder:
        data["config_folder"] = str(config_folder)
    return parse_config(data)


def breakdown(cfg) -> dict[str, float]:
    """Median phase times (s) of the trials after the first two, with ``wall``: the trial's
    whole drawing turn, and ``overhead``: the part of it the card is not drawing or scoring.

    A trial's records are written on the storage lane while the next one draws, so
    ``bookkeeping`` is waited for only where it outlasts the drawing. A trial's callback runs
    once the next trial has drawn, so the time between the callbacks of trials t-2 and t-1 is
    trial t's turn; the first trial pays one-off warm-ups."""
    study, ctx = prepare(cfg, log=lambda m: None)
    ends: dict[int, float] = {}

    def clock(study, trial) -> None:
        ends[trial.number] = time.perf_counter()

    optimize(study, ctx, log=lambda m: None, callbacks=[clock])
    rows = []
    for t in rf.completed(study):
        if t.number - 2 in ends and t.number - 1 in ends:
            laps = t.user_attrs[rf.ATTR_TIMINGS]
            wall = ends[t.number - 1] - ends[t.number - 2]
            rows.append(laps | {"wall": wall,
                                "overhead": wall - laps["generate"] - laps["score"]})
    return {p: statistics.median(r[p] for r in rows) for p in (*PHASES, "wall", "overhead")}


def show(label: str, split: dict[str, float]) -> float:
    """Prints the split; returns the share of a trial's wall time the card is not drawing or
    scoring for."""
    wall, overhead = split["wall"], split["overhead"]
    parts = "  ".join(f"{p} {split[p] * 1e3:8.1f} ms ({split[p] / wall:5.1%})" for p in PHASES)
    print(f"{label:10s} trial {wall:7.3f} s wall: {parts}; not drawing or scoring "
          f"{overhead * 1e3:.1f} ms ({overhead / wall:.1%})")
    return overhead / wall


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--probes", type=int, default=4 if gpu else 2, help="images per trial")
    parser.add_argument("--size", type=int, default=512 if gpu else 256)
    parser.add_argument("--steps", type=int, default=20 if gpu else 4)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--in-turn", action="store_true",
                        help="propose_ahead: false (each trial proposed after the last is stored)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the tiny family only, 64x64, 2 steps, 2 trials: plumbing, no goal")
    args = parser.parse_args()
    if args.dry_run:
        args.size, args.steps, args.trials = 64, 2, 4
    print(f"machine: {machine()}; device {args.device}, dtype {args.dtype}; probes: "
          f"{args.probes} images {args.size}x{args.size}, {args.steps} steps; "
          f"{'proposed in turn' if args.in_turn else 'proposed ahead (storage lane)'}")
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
