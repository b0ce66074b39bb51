"""``build_world``: train the whole world from its seed on two CPU worker processes.

Two single-threaded processes side by side beat one process with two threads on a 2-core CPU
for models this small (most of a step is per-operation overhead, not arithmetic). The stages
split so both stay busy: worker 0 trains the VAE, passes the CLIP's tuning pictures through it
and encodes the base's training latents while worker 1 trains the CLIP scorer, tunes it on the
tuning round trips and fits the house head; whichever is free first passes the house head's
pictures through the VAE; both then train the base UNet and text encoder data-parallel (each
half of every batch, gradients averaged over a gloo process group); last, worker 0 encodes
style A's latents and fine-tunes it, and worker 1 does the same for style B.
A stage's numbers depend on the plan alone, never on timing.

Example:
    >>> world = build_world(Path("toy"), BuildPlan(seed=0))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import queue
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from merge_backend.atomic_files import atomic_write_text
from merge_backend.devices import cpu_name
from toyworld.files import CHECKPOINTS, ToyWorld, save_safetensors, save_torch, write_world
from toyworld.stages import (
    BuildPlan,
    Work,
    stage_base,
    stage_clip,
    stage_clip_tune,
    stage_finetune,
    stage_head,
    stage_head_pictures,
    stage_latents,
    stage_tune_pictures,
    stage_vae,
)
from toyworld.train_clip import write_clip_config

# worker -> its stages in order; stages in PARALLEL run on every worker at once
WORKERS: tuple[tuple[tuple[str, Callable], ...], ...] = (
    (("vae", stage_vae), ("tune_pictures", stage_tune_pictures),
     ("latents_base", stage_latents("base")), ("head_pictures", stage_head_pictures),
     ("base", stage_base),
     ("latents_style_a", stage_latents("style_a")), ("style_a", stage_finetune("style_a"))),
    (("clip", stage_clip), ("head_pictures", stage_head_pictures),
     ("clip_tune", stage_clip_tune), ("head", stage_head), ("base", stage_base),
     ("latents_style_b", stage_latents("style_b")), ("style_b", stage_finetune("style_b"))),
)
PARALLEL = ("base",)
# a stage on both workers' lists but not in PARALLEL runs on the first worker to reach it: the
# house head's round trips go to whichever worker is free first, worker 0 once its VAE, tuning
# round trips and base latents are done or worker 1 once its CLIP is (on one 2-core machine the
# first, on another the second: RESULTS.md, issue 14, seventeenth pass)
EITHER = tuple(sorted(set.intersection(*({name for name, _ in stages} for stages in WORKERS))
                      - set(PARALLEL)))
# seconds per step on one idle core of the 2-core CPU, by the plan's SD1 config size, for the
# progress bar's ETA (measured: the CPU seconds of each stage in a build's manifest.json, over
# its steps; RESULTS.md, issue 14). "finetune" times style_a and style_b. The 16x16 sizes share
# their VAE and CLIP stages and differ in the UNet (the head's pictures: the shipped plan's 4000).
# toy16_lo's figures are the shipped world's build (RESULTS.md, issue 14, fifteenth pass); the
# other sizes' UNets were timed before it, ~10% slower a step. The round trips and encodes
# (tune_pictures, head_pictures, latents_*) are those times scaled by what the seventeenth pass's
# batch sizes took of the old ones' time, side by side on one machine. A size not here is timed
# as "tiny".
_TOY16_SCORERS = {"vae": 0.49, "tune_pictures": 116.0, "head_pictures": 52.0,
                  "latents_base": 44.0, "latents_style_a": 25.0, "latents_style_b": 25.0,
                  "clip": 0.19, "clip_tune": 0.16, "head": 0.01}
SECONDS_PER_STEP = {
    "tiny": {"vae": 0.34, "tune_pictures": 47.0, "head_pictures": 32.0, "latents_base": 23.0,
             "latents_style_a": 12.0, "latents_style_b": 12.0, "clip": 0.2, "clip_tune": 0.25,
             "head": 0.01, "base": 0.3, "finetune": 0.26},
    "toy16": {**_TOY16_SCORERS, "base": 0.4, "finetune": 0.35},
    "toy16_wide": {**_TOY16_SCORERS, "base": 0.58, "finetune": 0.55},
    "toy16_deep": {**_TOY16_SCORERS, "base": 0.65, "finetune": 0.66},
    "toy16_lo": {**_TOY16_SCORERS, "base": 0.246, "finetune": 0.24},
    "toy16_4x4": {**_TOY16_SCORERS, "base": 0.22, "finetune": 0.2},
    "toy16_mid": {**_TOY16_SCORERS, "base": 0.19, "finetune": 0.17},
}


def stage_steps(plan: BuildPlan) -> dict[str, int]:
    return {"vae": plan.vae.steps, "tune_pictures": 1, "head_pictures": 1, "latents_base": 1,
            "latents_style_a": 1, "latents_style_b": 1,
            "base": plan.base.steps,
            "style_a": plan.finetune.steps, "clip": plan.clip.steps,
            "clip_tune": plan.clip.tune_steps, "head": plan.head.steps,
            "style_b": plan.finetune.steps}


class _Reporter:
    """Sends a stage's progress to the parent, at most twice a second."""

    def __init__(self, name: str, messages) -> None:
        self.name = name
        self.messages = messages
        self.last = 0.0

    def __call__(self, step: int, total: int, note: str) -> None:
        now = time.monotonic()
        if step == total or now - self.last > 0.5:
            self.last = now
            self.messages.put(("step", self.name, step, note))


def _worker(index: int, plan: BuildPlan, work: Work, messages, failed) -> None:
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    work.failed = failed.is_set
    current = ""
    try:
        for name, stage in WORKERS[index]:
            if name in EITHER and not work.claim(name):
                continue
            current = name
            report = _Reporter(name, messages)

            started, cpu = time.monotonic(), time.process_time()
            if name in PARALLEL:
                dist.init_process_group("gloo", init_method=f"file://{work.folder}/{name}.ddp",
                                        rank=index, world_size=len(WORKERS))
            try:
                stage(plan, work, report)
            finally:
                if name in PARALLEL:
                    dist.destroy_process_group()
            if index == 0 or name not in PARALLEL:
                messages.put(("done", name, time.monotonic() - started,
                              f"{time.process_time() - cpu:.1f}"))
    except BaseException:  # noqa: B036 - the parent must hear of any failure
        failed.set()
        messages.put(("error", current, 0, traceback.format_exc()))


def build_world(folder: Path, plan: BuildPlan = BuildPlan(), *, progress=None,
                keep_work: bool = False) -> ToyWorld:
    """Train every model of the world into ``folder`` and write it as a world folder."""
    from merge_backend.pipeline import write_config_folder

    folder = Path(folder)
    work_folder = folder / "work"
    if work_folder.exists():
        shutil.rmtree(work_folder)  # a stale rendezvous file or stage output must not be reused
    work_folder.mkdir(parents=True)
    config_folder = write_config_folder("sd1", folder / "config", size=plan.size)
    clip_config = write_clip_config(work_folder / "toyworld-clip.json")
    work = Work(work_folder, config_folder, clip_config)
    progress = progress or BuildProgress(stage_steps(plan), size=plan.size)
    ctx = mp.get_context("spawn")
    messages, failed = ctx.Queue(), ctx.Event()
    workers = [ctx.Process(target=_worker, args=(i, plan, work, messages, failed), daemon=True)
               for i in range(len(WORKERS))]
    started = time.monotonic()
    for w in workers:
        w.start()
    timings: dict[str, float] = {}
    try:
        _follow(workers, messages, progress, timings)
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()
    assemble(work, folder)
    # wall seconds per stage, and the CPU seconds its process got ("(cpu)"): on a machine
    # shared with other work the CPU time is what the stage would take on idle cores
    info = {"plan": asdict(plan), "stage_seconds": timings,
            "build_seconds": round(time.monotonic() - started, 1),
            "torch": torch.__version__, "threads": "2 processes x 1 thread",
            "machine": f"{platform.machine()} {cpu_name()}"}
    atomic_write_text(folder / "manifest.json", json.dumps(info, indent=2) + "\n")
    if not keep_work:
        shutil.rmtree(work_folder)
    progress.close()
    return write_world(folder, source=folder)


def _follow(workers, messages, progress, timings: dict[str, float]) -> None:
    remaining = len(WORKERS)
    while remaining:
        try:
            kind, name, value, note = messages.get(timeout=1.0)
        except queue.Empty:
            dead = [w for w in workers if not w.is_alive() and w.exitcode not in (0, None)]
            if dead:
                raise RuntimeError(f"a build worker died (exit code {dead[0].exitcode})") from None
            continue
        if kind == "error":
            raise RuntimeError(f"toy world build failed in stage {name}:\n{note}")
        if kind == "step":
            progress.update(name, value, note)
        elif kind == "done":
            timings[name] = round(value, 1)
            timings[f"{name} (cpu)"] = float(note)
            progress.update(name, progress.steps[name], "done")
            if name in (stages[-1][0] for stages in WORKERS):
                remaining -= 1


def assemble(work: Work, folder: Path) -> None:
    """Write the stages' outputs as the world's files (fp16 single files in the users' layout,
    the CLIP scorer, the house head)."""
    from merge_backend.tiny import original_state_dict
    from toyworld.train_clip import create_clip
    from toyworld.training import build

    vae = build("vae", work.config_folder)
    vae.load_state_dict(work.load("vae"))
    for name in CHECKPOINTS:
        parts = work.load(name)
        unet, te = build("unet", work.config_folder), build("te", work.config_folder)
        unet.load_state_dict(parts["unet"])
        te.load_state_dict(parts["te"])
        state = original_state_dict("sd1", {"unet": unet, "te": te, "vae": vae})
        save_safetensors(state, folder / f"{name}.safetensors")
    model, _ = create_clip(work.clip_config, 0)
    model.load_state_dict(work.load("clip"))
    save_safetensors(model.state_dict(), folder / f"{work.clip_config.stem}.safetensors")
    shutil.copyfile(work.clip_config, folder / work.clip_config.name)
    save_torch({k: v.half() for k, v in work.load("head").items()}, folder / "house_head.pth")


class BuildProgress:
    """One status line: a bar over the whole build (weighted by each stage's expected time),
    the running stages with their step counts, elapsed time and an estimate of what is left."""

    def __init__(self, steps: dict[str, int], stream=sys.stderr, width: int = 30,
                 size: str = "tiny"):
        self.steps = steps
        self.done = dict.fromkeys(steps, 0)
        self.notes = dict.fromkeys(steps, "")
        self.stream = stream
        self.width = width
        self.start = time.monotonic()
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.last_print = 0.0
        per_step = SECONDS_PER_STEP.get(size, SECONDS_PER_STEP["tiny"])
        self.cost = {k: n * per_step["finetune" if k.startswith("style_") else k]
                     for k, n in steps.items()}

    def fraction(self) -> float:
        total = sum(self.cost.values())
        return sum(self.cost[k] * self.done[k] / max(self.steps[k], 1) for k in self.steps) / total

    def update(self, name: str, step: int, note: str) -> None:
        self.done[name] = step
        self.notes[name] = note
        now = time.monotonic()
        if not self.tty and now - self.last_print < 15 and note != "done":
            return
        self.last_print = now
        frac = self.fraction()
        elapsed = now - self.start
        left = elapsed * (1 - frac) / frac if frac > 0.02 else float("nan")
        filled = int(self.width * frac)
        running = [f"{k} {self.done[k]}/{self.steps[k]} {self.notes[k]}".strip()
                   for k in self.steps if 0 < self.done[k] < self.steps[k]]
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {frac:4.0%} "
                f"{_clock(elapsed)} elapsed, ~{_clock(left)} left | " + " | ".join(running))
        if self.tty:
            print("\r" + line[:160].ljust(160), end="", file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no estimate yet
        return "--:--"
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"
