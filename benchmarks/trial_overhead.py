"""Benchmark (issue 15): a trial's search overhead at trial 10, 100 and 500 of one study.

The overhead is everything a worker does per trial besides building the candidate (engine
apply), drawing its probes and scoring them: the sampler's proposal, storage reads and writes
(ask, parameters, attributes, artifacts, the dashboard note, tell), the probe grid and ratio
chart, the progress line. It is measured as the wall time between the ends of two consecutive
trials minus that trial's apply + generate + score, and is what decides trials per GPU-hour
once generation is fast. One study of 505 trials on the tiny SD1 family (64x64, 2 steps, one
probe; a tiny random CLIP scorer), SQLite in the run folder, all 26 MBW blocks free, the
worker and progress callback `mergesearch run` uses. Each figure is the median over the 51
trials ending at the mark (at trial 10: trials 1 to 10); `cpu mean` is the CPU overhead's mean
there, its occasional spikes (the collector, SQLite's checkpoints) included. Five trials were
too few: the median of the five ending at trial 500 ranged 42-57 ms over runs of the same
code whose medians over trials 400-505 were 43-44 ms.

The worker proposes the next trial and stores the last one on its storage lane (a background
thread, ``search.lane``) while a trial draws, so the wall overhead is what the drawing thread
waits for. The CPU overhead counts all the search's work instead, the lane's included: the
process's CPU seconds per trial minus the drawing thread's own CPU seconds inside apply,
generate and score (torch on one thread; those calls are timed by wrapping them). On a shared
machine wall time measures the neighbours too; the CPU figure does not. Each mark's line is
printed as soon as the study passes it.

    .venv/bin/python benchmarks/trial_overhead.py [--sampler NAME] [--scorer clip|reference]
        [--trials 505] [--in-turn]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fullsize import goal, machine  # noqa: E402

from evaluators.testing import write_tiny_open_clip  # noqa: E402
from merge_backend.tiny import write_tiny_family  # noqa: E402
from search import run_folder as rf  # noqa: E402
from search.config import parse_config  # noqa: E402
from search.progress import Progress  # noqa: E402
from search.study import optimize, prepare  # noqa: E402

MARKS = (10, 100, 500)
ACCELERATOR = ("apply", "generate", "score")  # what is not overhead


def study_config(folder: Path, fam, clip, sampler: str | None, trials: int, ahead: bool = True,
                 references: Path | None = None):
    """The study; ``references``: a paired ``reference`` scorer against that folder's one
    picture instead of the CLIP score; ``sampler`` None: the config's default for it."""
    scorer = {"kind": "clip", "model": str(clip[0]), "weights": str(clip[1])}
    if references is not None:
        scorer |= {"kind": "reference", "mode": "paired", "references": str(references)}
    return parse_config({
        "name": "overhead", "models": {"model1": str(fam.a), "model2": str(fam.b)},
        "config_folder": str(fam.config_folder),
        "merge": {"vocabulary": "mbw", "arithmetic": "fast"},
        "probes": {"prompts": ["a lighthouse on a cliff at dawn"], "seeds": [1], "steps": 2,
                   "cfg": 6.0, "width": 64, "height": 64},
        "scorers": [scorer],
        "sampler": {"seed": 0} | ({"name": sampler} if sampler else {}),
        "warm_start": {"model1": True, "model2": True, "uniform": [0.5]},
        "trials": trials, "output": str(folder), "device": "cpu", "dtype": "fp32",
        "propose_ahead": ahead})


class _CpuMeter:
    """The calling thread's CPU seconds inside the wrapped calls (apply, generate, score): not
    the process's, which would count the storage lane's work beside them as generation."""

    def __init__(self) -> None:
        self.busy = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy += time.thread_time() - start
        return timed


def measure(cfg) -> list[dict[str, float]]:
    """Per COMPLETE trial: its overhead and its parts (ms), in trial order."""
    import search.trial as trial_module

    study, ctx = prepare(cfg, log=lambda m: None)
    meter = _CpuMeter()
    ctx.engine.apply = meter.wrap(ctx.engine.apply)
    trial_module.generate = meter.wrap(trial_module.generate)
    trial_module.score_images = meter.wrap(trial_module.score_images)
    progress = Progress(cfg.trials, stream=io.StringIO())
    rows: list[dict[str, float]] = []
    previous: list[tuple[float, float, float]] = []

    def clock(study, trial) -> None:
        progress(study, trial)
        now = (time.perf_counter(), time.process_time(), meter.busy)
        if previous and trial.state == optuna.trial.TrialState.COMPLETE:
            laps = trial.user_attrs[rf.ATTR_TIMINGS]
            wall = now[0] - previous[-1][0]
            busy = sum(laps[k] for k in ACCELERATOR)
            cpu = (now[1] - previous[-1][1]) - (now[2] - previous[-1][2])
            rows.append({"number": trial.number, "wall": wall * 1e3,
                         "overhead": (wall - busy) * 1e3, "cpu_overhead": cpu * 1e3,
                         "suggest": laps["suggest"] * 1e3,
                         "bookkeeping": laps["bookkeeping"] * 1e3,
                         "generate": laps["generate"] * 1e3})
            if trial.number in MARKS:
                show(rows, trial.number)
        previous.append(now)

    optimize(study, ctx, log=lambda m: None, callbacks=[clock])
    return rows


WINDOW = 51  # trials ending at a mark that its figures summarise


def show(rows: list[dict[str, float]], mark: int) -> None:
    print(f"{mark:6d} {at(rows, mark, 'cpu_overhead'):9.1f} "
          f"{at(rows, mark, 'cpu_overhead', statistics.mean):9.1f} "
          f"{at(rows, mark, 'overhead'):9.1f} {at(rows, mark, 'bookkeeping'):9.1f} "
          f"{at(rows, mark, 'generate'):9.1f} {at(rows, mark, 'wall'):8.1f}", flush=True)


def at(rows: list[dict[str, float]], mark: int, key: str, summary=statistics.median) -> float:
    return summary([r[key] for r in rows if mark - WINDOW < r["number"] <= mark])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sampler", default=None,
                        help="default: the project's default sampler for the scorer")
    parser.add_argument("--scorer", choices=("clip", "reference"), default="clip",
                        help="reference: paired, against one picture (its default sampler: lsq)")
    parser.add_argument("--trials", type=int, default=max(MARKS) + 5)
    parser.add_argument("--in-turn", action="store_true",
                        help="propose_ahead: false (each trial proposed after the last is stored)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # CPU time = what one core's wall time would be
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = write_tiny_open_clip(tmp / "clip", name="bench-clip")
        fam = write_tiny_family(tmp / "tiny", "sd1")
        references = None
        if args.scorer == "reference":
            references = tmp / "references"
            references.mkdir()
            pixels = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0))
            Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(references / "0.png")
        cfg = study_config(tmp / "runs", fam, clip, args.sampler, args.trials,
                           not args.in_turn, references)
        print(f"machine: {machine()}; sampler {cfg.sampler.name}, scorer {args.scorer}; "
              f"{args.trials} trials, SQLite; "
              f"{'proposed in turn' if args.in_turn else 'proposed ahead (storage lane)'}")
        print(f"{'trial':>6s} {'cpu ovh':>9s} {'cpu mean':>9s} {'wall ovh':>9s} {'records':>9s} "
              f"{'generate':>9s} {'wall':>8s}  (ms, median of the {WINDOW} trials ending there "
              "but `cpu mean`; all but `cpu ovh` and `cpu mean` wall time; `records`: the "
              "trial's pictures, note and attributes, on the lane when proposed ahead)",
              flush=True)
        started = time.perf_counter()
        rows = measure(cfg)
        print(f"{len(rows) + 1} trials in {time.perf_counter() - started:.0f} s")
    mark = [m for m in MARKS if m <= rows[-1]["number"]][-1]
    goal(f"trial_overhead_at_{mark}", at(rows, mark, "overhead"), 50.0, fmt="{:.1f}")
    goal(f"trial_cpu_overhead_at_{mark}", at(rows, mark, "cpu_overhead"), 50.0, fmt="{:.1f}")


if __name__ == "__main__":
    main()
