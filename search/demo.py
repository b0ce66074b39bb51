"""`mergesearch demo` (= `make demo`): find a hidden block merge of the built-in tiny models.

A hidden target merge of the tiny SD1.5 fine-tunes, with a secret MBW ratio per block group,
draws reference probes. A study with the `reference` scorer (CLIP image-image similarity to
those probes) searches for it. At the end the best ratios are printed beside the hidden ones,
with their RMSE and both scores, and the commands that open the dashboard and export the
result. Everything runs on the CPU in a few minutes; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from evaluators import combine, generate, score_images
from evaluators.testing import write_tiny_open_clip
from merge_backend.tiny import write_tiny_family

from . import run_folder as rf
from .config import StudyConfig, parse_config
from .progress import Progress
from .study import optimize, prepare

# MBW groups searched by the demo (each tie is one parameter) and the secret ratios. On the tiny
# random UNet the shallow blocks shape the image and the deep ones (IN05..OUT03) barely do, so
# those are held fixed, as MBW users fix blocks they do not want to move.
GROUPS = {
    "IN00+IN01": ["IN00", "IN01"],
    "IN02+IN03+IN04": ["IN02", "IN03", "IN04"],
    "OUT04+OUT05+OUT06+OUT07": ["OUT04", "OUT05", "OUT06", "OUT07"],
    "OUT08+OUT09": ["OUT08", "OUT09"],
    "OUT10+OUT11": ["OUT10", "OUT11"],
}
HIDDEN = {"IN00+IN01": 0.75, "IN02+IN03+IN04": 0.30, "OUT04+OUT05+OUT06+OUT07": 0.60,
          "OUT08+OUT09": 0.20, "OUT10+OUT11": 0.85}
FIXED = {"BASE": 1.0, "M00": 0.5, **{f"IN{i:02d}": 0.5 for i in range(5, 12)},
         **{f"OUT{i:02d}": 0.5 for i in range(4)}}
DEFAULT_TRIALS = 150


def demo_config(folder: Path, trials: int = DEFAULT_TRIALS, seed: int = 0) -> dict:
    """The demo's study config (also written to FOLDER/demo.yaml for users to read)."""
    models = folder / "models"
    family = write_tiny_family(models, "sd1", seed=0)
    clip_config, clip_weights = write_tiny_open_clip(models / "clip", name="demo-clip", seed=0)
    return {
        "name": "demo",
        "models": {"model1": str(family.a), "model2": str(family.b)},
        "config_folder": str(family.config_folder),
        "merge": {"method": "weighted_sum", "vocabulary": "mbw", "arithmetic": "fast",
                  "fixed": FIXED,
                  "tied": list(GROUPS.values())},
        "probes": {"prompts": ["a red apple on a table", "a castle at night"], "seeds": [1, 2],
                   "steps": 4, "cfg": 5.0, "width": 64, "height": 64, "scheduler": "euler",
                   "batch_size": 4},
        "scorers": [{"kind": "reference", "name": "reference", "model": str(clip_config),
                     "weights": str(clip_weights), "mode": "paired", "range": [0.0, 1.0]}],
        "sampler": {"name": "tpe", "seed": seed, "options": {"n_startup_trials": 20}},
        "warm_start": {"model1": True, "model2": True, "uniform": [0.5]},
        "trials": trials,
        "output": str(folder),
        "device": "auto",
        "dtype": "auto",
    }


def preference_config(folder: Path, trials: int = 30, candidates: int = 4) -> dict:
    """The demo's models, merge and probes as a preference study: a person chooses in the
    dashboard instead of the reference scorer (``mergesearch demo --preference``)."""
    data = demo_config(folder, trials)
    data.update(name="demo-preference", objective="preference", scorers=[],
                sampler={"name": "preferential_gp", "seed": 0},
                preference={"candidates": candidates}, trials=trials)
    return data


def write_preference_config(folder: Path, trials: int = 30, candidates: int = 4) -> Path:
    """FOLDER/preference.yaml (the models written beside it), for `mergesearch run`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "preference.yaml"
    path.write_text(yaml.safe_dump(preference_config(folder.absolute(), trials, candidates),
                                   sort_keys=False))
    return path


def hidden_params() -> dict[str, float]:
    return dict(HIDDEN)


def run_demo(folder: Path = Path("demo_run"), trials: int = DEFAULT_TRIALS, fresh: bool = False,
             seed: int = 0, out=sys.stdout) -> dict:
    """Run the demo study; returns the numbers it prints (for tests)."""
    folder = Path(folder)
    if fresh and folder.exists():
        shutil.rmtree(folder)
    data = demo_config(folder, trials, seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "demo.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    cfg: StudyConfig = parse_config(data, source=str(folder / "demo.yaml"))
    study, ctx = prepare(cfg)
    target = ctx.space.recipe(ctx.space.params_for(
        {b: HIDDEN[name] for name, blocks in GROUPS.items() for b in blocks}))
    ctx.engine.apply(target)
    reference = generate(ctx.pipe, ctx.probes)
    ctx.scorers[0].set_references(reference.images)
    hidden_score = combine(score_images(reference, ctx.scorers), ctx.norms)
    result = optimize(study, ctx, callbacks=[Progress(cfg.trials)])
    if result.interrupted or rf.best_trial(study) is None:
        print(f"\n{'interrupted' if result.interrupted else 'no trial completed'}: "
              f"{result.completed} of {result.target} trials are complete; `mergesearch demo` "
              "again resumes", file=sys.stderr)
        return {"interrupted": result.interrupted, "trials": result.completed}
    return report(study, ctx, hidden_score, out)


def report(study, ctx, hidden_score: float, out) -> dict:
    best = rf.best_trial(study)
    found = {name: best.params[name] for name in GROUPS}
    rmse = math.sqrt(sum((found[n] - HIDDEN[n]) ** 2 for n in GROUPS) / len(GROUPS))
    gap = (hidden_score - best.value) / abs(hidden_score)
    print("\nblock group                 hidden   found", file=out)
    for name in GROUPS:
        print(f"  {name:26s} {HIDDEN[name]:6.3f}  {found[name]:6.3f}", file=out)
    print(f"ratio RMSE over the searched blocks: {rmse:.4f} (goal <= 0.1)", file=out)
    print(f"best score {best.value:.6f} (trial {best.number}); hidden merge's own score "
          f"{hidden_score:.6f}; gap {gap * 100:.3f}% (goal <= 1%)", file=out)
    run = shlex.quote(str(Path(ctx.run.path).absolute()))
    print("\nnext:", file=out)
    print(f"  mergesearch status {run}", file=out)
    print(f"  mergesearch dashboard {run}      # http://127.0.0.1:8080", file=out)
    print(f"  mergesearch export {run} --best --to checkpoint --to comfyui", file=out)
    result = {"rmse": rmse, "best_score": best.value, "hidden_score": hidden_score,
              "gap": gap, "best_trial": best.number, "found": found, "hidden": dict(HIDDEN),
              "trials": len(study.trials)}
    (Path(run) / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result
