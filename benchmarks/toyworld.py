"""Benchmark (issue 14): the toy world's acceptance figures, measured on the shipped weights.

No training: the shipped world is written to a temporary folder and measured the way a user's
study would use it (load_pipeline, the real `clip` / `reference` / `laion_aesthetic` scorers,
the merge engine, a real study for the trial time, `mergesearch demo` for the demo time).

- zero-shot naming: the base model draws the 8 held-out prompts x 32 seeds; the CLIP scorer
  names shape and colour (goal >= 90% each);
- style probe: a linear probe on CLIP embeddings (fit on drawn plain / A / B pictures) tells
  style_a's held-out probes from style_b's >= 95% of the time, and calls >= 95% of the base's
  neither (plain); what it calls each model's probes among all three is printed;
- sensitivity: at a hidden random merge, +-0.3 on one MBW block moves the `reference` score by
  >= 1% of its observed range, for >= 18 of the 26 blocks; measured at three hidden merges,
  the figure is the median count (the table of all three is printed);
- house style: the best of a 500-trial search beats both parents and the uniform 0.5 merge
  by >= 10% of the search's score range, on the training and the held-out probes;
- one trial of the demo's study <= 0.5 s; `mergesearch demo` <= 5 minutes.

    .venv/bin/python benchmarks/toyworld.py [--no-demo] [--house-trials 500] [--world DIR]

``--world DIR`` measures a world a build wrote (`mergesearch toyworld build DIR --plan NAME`)
instead of the shipped one; the demo is timed on the shipped world either way.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# this script's folder goes last: first it would shadow the `toyworld` package with this file
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] \
    + [str(HERE)]
from _fullsize import goal, machine  # noqa: E402

from search.cli import quiet_libraries  # noqa: E402
from search.toyworld_figures import measure_figures  # noqa: E402
from toyworld.files import write_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-demo", action="store_true", help="skip timing `mergesearch demo`")
    parser.add_argument("--house-trials", type=int, default=500)
    parser.add_argument("--world", type=Path, help="a built world's folder (default: shipped)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # one thread: the world's models gain nothing from a second one, and the CPU time a trial
    # takes then equals the wall time it would take on an idle core
    torch.set_num_threads(1)
    quiet_libraries()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; {load}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        world = write_world(Path(tmp) / "world", **({"source": args.world} if args.world else {}))
        figures = measure_figures(world, demo=not args.no_demo, house_trials=args.house_trials)
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")
    for name, fig in figures.items():
        fmt = "{:.0f}" if name in ("sensitive_blocks", "demo_seconds") else "{:.3f}"
        goal(name, fig.measured, fig.target, fig.higher_is_better, fmt)


if __name__ == "__main__":
    main()
