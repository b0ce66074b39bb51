"""The GPU check (issue 12): everything that needs a GPU, in one call, for the day one is lent.

    make gpu-check                       # = .venv/bin/python benchmarks/gpu_check.py
    make gpu-check GPU_PYTHON=python3    # a host whose python already has torch with CUDA
    make gpu-check GPU_CHECK_ARGS=--dry-run   # the same steps, small, on a CPU (plumbing)

Steps, each a child process with its own time limit (7.5 minutes in all, so the whole check
ends inside 8 minutes on one H100), their output passed through untouched so it can be pasted
into benchmarks/RESULTS.md:

1. the card, the driver and the software versions, then the two full-size SD1.5 checkpoints
   (random weights from the default configs, fp16, 2 x 2 GiB) built into benchmarks/.cache
   unless they are there already;
2. every ``gpu``-marked test (engine on CUDA: offload staging, fp16 sources staged from the
   host, images after apply; tiny pipelines in fp16; scorer preprocessing on CUDA);
3. ``benchmarks/merge_engine.py --device cuda`` (full-size SD1.5, fp16: apply vs the memory
   floor, vs save + load);
4. ``benchmarks/trial_breakdown.py``: a realistic trial — full-size SD1.5 with random weights,
   4 probes of 512x512, 20 steps, fp16 — split into suggest / apply / generate / score,
   and the share of its wall time the card is not drawing or scoring;
5. ``benchmarks/scorer_preprocess.py --device cuda`` (preprocessing equal to the references,
   and its speed against the PIL path).

It ends with one GOAL line per step (``gpu_check_<step>_failed``: 0 when it exited 0) plus the
steps' own GOAL lines, and exits non-zero if any step failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
NEEDED = ("torch", "diffusers", "transformers", "open_clip", "ftfy", "optuna", "sqlalchemy",
          "alembic", "colorlog", "pydantic", "safetensors", "PIL", "psutil", "yaml", "pytest",
          "optuna_dashboard", "bottle", "lycoris", "toml")


def steps(dry_run: bool) -> list[tuple[str, list[str], int]]:
    """(name, argv, seconds allowed). Dry run: the same scripts, tiny and on the CPU."""
    py = sys.executable
    tests = [py, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
             *gpu_test_files()]
    if dry_run:
        return [("gpu_tests", tests, 300),
                ("merge_engine", [py, str(BENCH / "merge_engine.py"), "--dry-run"], 300),
                ("trial_breakdown", [py, str(BENCH / "trial_breakdown.py"), "--dry-run",
                                     "--probes", "4"], 300),
                ("scorer_preprocess", [py, str(BENCH / "scorer_preprocess.py"), "--dry-run"],
                 120)]
    prepare = ("import sys; sys.path.insert(0, 'benchmarks'); from _fullsize import "
               "full_size_files; print(*full_size_files('sd1', 2))")
    return [("full_size_files", [py, "-c", prepare], 90),
            ("gpu_tests", tests, 100),
            ("merge_engine", [py, str(BENCH / "merge_engine.py"), "--device", "cuda",
                              "--repeat", "3"], 150),
            ("trial_breakdown", [py, str(BENCH / "trial_breakdown.py"), "--device", "cuda",
                                 "--dtype", "fp16", "--probes", "4", "--size", "512",
                                 "--steps", "20", "--trials", "6"], 90),
            ("scorer_preprocess", [py, str(BENCH / "scorer_preprocess.py"), "--device", "cuda"],
             20)]


def gpu_test_files() -> list[str]:
    """The test files holding ``gpu`` marks, in their own text or in a shipped contract they
    import (``evaluators.scorer_contract``, ...): collecting only them keeps the run short and
    free of the modules that need a database or a browser."""
    mark = re.compile(r"pytest\.mark\.gpu")
    imported = re.compile(r"^from ((?:merge_backend|evaluators|search)[\w.]*) import", re.M)

    def has_mark(text: str) -> bool:
        if mark.search(text):
            return True
        modules = (ROOT / (name.replace(".", "/") + ".py") for name in imported.findall(text))
        return any(m.is_file() and mark.search(m.read_text(encoding="utf-8")) for m in modules)

    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if has_mark(p.read_text(encoding="utf-8")))


def describe_machine(dry_run: bool) -> bool:
    """Print the card and the versions; False if this machine cannot run the check."""
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    print(f"python {platform.python_version()} ({sys.executable}); {platform.node()} "
          f"{platform.machine()}, {os.cpu_count()} CPUs")
    if missing:
        print(f"gpu-check: python packages missing here: {', '.join(missing)}; install the "
              "project (make test does) or carry them as wheels (benchmarks/RESULTS.md, GPU)")
        return False
    import torch

    print(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}")
    if not torch.cuda.is_available():
        print("card: none (no CUDA device)" + ("; dry run on the CPU" if dry_run else ""))
        if not dry_run:
            print("gpu-check: no CUDA device on this machine; run with --dry-run to check the "
                  "plumbing on a CPU")
        return dry_run
    props = torch.cuda.get_device_properties(0)
    print(f"card: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
          f"{props.major}.{props.minor}, {props.multi_processor_count} SMs")
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"]
        print("nvidia-smi:", subprocess.run(query, capture_output=True, text=True).stdout.strip())
    return True


def run_step(name: str, argv: list[str], limit: int) -> tuple[int, float]:
    print(f"\n===== {name}: {' '.join(Path(a).name if a.startswith('/') else a for a in argv)}",
          flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                      os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    try:
        code = subprocess.run(argv, cwd=ROOT, env=env, timeout=limit).returncode
    except subprocess.TimeoutExpired:
        print(f"===== {name}: stopped after its {limit} s limit")
        code = 124
    seconds = time.perf_counter() - start
    print(f"===== {name}: exit {code} in {seconds:.1f} s", flush=True)
    return code, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step small, on the CPU, to check the plumbing")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"gpu-check {'(dry run) ' if args.dry_run else ''}{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    if not describe_machine(args.dry_run):
        return 2
    results = [(name, *run_step(name, argv, limit)) for name, argv, limit in steps(args.dry_run)]
    total = time.perf_counter() - start
    print("\n===== summary")
    for name, code, seconds in results:
        print(f"GOAL gpu_check_{name}_failed measured={int(code != 0)} target<=0 "
              f"{'met' if code == 0 else 'missed'}  ({seconds:.1f} s)")
    minutes = total / 60
    print(f"GOAL gpu_check_minutes measured={minutes:.2f} target<=8.00 "
          f"{'met' if minutes <= 8 else 'missed'}")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
