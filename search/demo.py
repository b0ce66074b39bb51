"""`mergesearch demo` (= `make demo`): find a hidden block merge in the toy world.

The toy world (``toyworld``: a tiny SD1 family and CLIP scorer trained on drawn shapes) ships
two fine-tunes of one base, style A (soft, warm) and style B (outlined, cool, checkered). A
hidden merge of them, with a secret ratio for every one of the 26 MBW blocks, draws reference
probes; a study with the `reference` scorer (CLIP image-image similarity to those probes)
searches all 26 blocks for it: none fixed, none tied (BASE, the text encoder, is searched as
the text-encoder ratio). At the end the best ratios are printed beside the hidden ones with
their RMSE and both scores, and the commands that open the dashboard and export the result.
Everything runs on the CPU in a few minutes; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from evaluators import ProbeImages, combine, generate, load_image_folder, score_images
from merge_backend.atomic_files import atomic_folder, atomic_write_text
from toyworld.figures import sensitivity_of
from toyworld.files import SHIPPED, study_probes, write_world

from . import run_folder as rf
from .cli_options import DEMO_TRIALS, PREFERENCE_CANDIDATES, PREFERENCE_TRIALS
from .config import StudyConfig, parse_config
from .progress import Progress
from .study import OtherConfigError, optimize, prepare

HIDDEN_SEED = 0
REFERENCES = "references"  # FOLDER/references: the hidden merge's probes, one PNG each


def demo_config(folder: Path, trials: int = DEMO_TRIALS, seed: int = 0,
                world_source: Path = SHIPPED) -> dict:
    """The demo's study config (also written to FOLDER/demo.yaml, which `mergesearch run`
    runs like `mergesearch demo`), on the shipped world or another world folder
    (``world_source``). Its reference scorer compares with FOLDER/references
    (``draw_hidden_merge``)."""
    world = write_world(folder / "models", source=world_source)
    return {
        "name": "demo",
        "models": {"model1": str(world.style_a), "model2": str(world.style_b)},
        "config_folder": str(world.config_folder),
        "merge": {"method": "weighted_sum", "vocabulary": "mbw", "arithmetic": "fast",
                  "text_encoder": {"mode": "merge", "ratio": {"low": 0.0, "high": 1.0}}},
        "probes": study_probes(world),
        "scorers": [{"kind": "reference", "name": "reference", "model": str(world.clip_config),
                     "weights": str(world.clip_weights), "mode": "paired", "range": [0.5, 1.0],
                     "references": str(Path(folder).absolute() / REFERENCES)}],
        # the project's default sampler with its defaults (chosen by benchmarks/search_quality.py)
        "sampler": {"seed": seed},
        "warm_start": {"model1": True, "model2": True, "uniform": [0.5]},
        "trials": trials,
        "output": str(folder),
        "device": "auto",
        "dtype": "auto",
    }


def preference_config(folder: Path, trials: int = PREFERENCE_TRIALS,
                      candidates: int = PREFERENCE_CANDIDATES) -> dict:
    """The demo's models, merge and probes as a preference study: a person chooses in the
    dashboard instead of the reference scorer (``mergesearch demo --preference``)."""
    data = demo_config(folder, trials)
    data.update(name="demo-preference", objective="preference", scorers=[],
                sampler={"name": "preferential_gp", "seed": 0},
                preference={"candidates": candidates}, trials=trials)
    return data


def write_preference_config(folder: Path, trials: int = PREFERENCE_TRIALS,
                            candidates: int = PREFERENCE_CANDIDATES) -> Path:
    """FOLDER/preference.yaml (the models written beside it), for `mergesearch run`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "preference.yaml"
    atomic_write_text(path, yaml.safe_dump(preference_config(folder.absolute(), trials,
                                                             candidates), sort_keys=False))
    return path


def hidden_ratios() -> dict[str, float]:
    """The secret per-block ratios (MBW names), drawn from a fixed seed."""
    from toyworld.figures import hidden_ratios as draw

    return draw(HIDDEN_SEED, low=0.1, high=0.9)


def run_demo(folder: Path = Path("demo_run"), trials: int = DEMO_TRIALS, fresh: bool = False,
             seed: int = 0, out=sys.stdout) -> dict:
    """Run the demo study; returns the numbers it prints (for tests)."""
    import torch

    # one CPU thread: the toy world's models gain nothing from a second, and on a CPU shared
    # with other work two threads waiting on each other took 150 trials from 66 s to 979 s
    torch.set_num_threads(1)
    # absolute: demo.yaml's paths resolve next to it, not where the demo was started
    folder = Path(folder).absolute()
    if fresh and folder.exists():
        if any(folder.iterdir()) and not (folder / "demo.yaml").is_file():
            raise ValueError(f"--fresh: {folder} holds files but no demo.yaml: not a demo folder, "
                             "so it is not deleted; give --folder a new or demo folder")
        shutil.rmtree(folder)
    data = demo_config(folder, trials, seed)
    folder.mkdir(parents=True, exist_ok=True)
    hidden = hidden_ratios()
    references = folder / REFERENCES
    if not references.is_dir():
        draw_hidden_merge(data, hidden, references)
    atomic_write_text(folder / "demo.yaml", yaml.safe_dump(data, sort_keys=False))
    cfg: StudyConfig = parse_config(data, source=str(folder / "demo.yaml"))
    try:
        study, ctx = prepare(cfg)
    except OtherConfigError:
        raise OtherConfigError(f"{folder}: its study was made by another version of the demo "
                               "and cannot go on; `mergesearch demo --fresh` starts it over"
                               ) from None
    # the hidden merge's own score: its probes as the scorer holds them (8-bit, from the files)
    drawn = ProbeImages.of(cfg.probes, torch.stack(load_image_folder(references)))
    hidden_score = combine(score_images(drawn, ctx.scorers), ctx.norms)
    result = optimize(study, ctx, callbacks=[Progress(cfg.trials)])
    if result.interrupted or rf.best_trial(study) is None:
        print(f"\n{'interrupted' if result.interrupted else 'no trial completed'}: "
              f"{result.completed} of {result.target} trials are complete; `mergesearch demo` "
              "again resumes", file=sys.stderr)
        return {"interrupted": result.interrupted, "trials": result.completed}
    return report(study, ctx, hidden, hidden_score, out)


def draw_hidden_merge(data: dict, hidden: dict[str, float], folder: Path) -> None:
    """The hidden merge's probes as PNG files in ``folder`` (000.png, ... in probe order: what
    the demo's `reference` scorer compares with), drawn the way the study draws a candidate."""
    from merge_backend.export import png_bytes

    from .study import candidate_pipeline, check_config, resolve_device

    cfg = parse_config({**data, "scorers": [{**s, "references": None} for s in data["scorers"]]})
    space = check_config(cfg)
    pipe, engine = candidate_pipeline(cfg, space, *resolve_device(cfg))
    engine.apply(space.block_recipe(hidden))
    images = generate(pipe, cfg.probes).images
    with atomic_folder(folder) as tmp:
        for i, image in enumerate(images):
            (tmp / f"{i:03d}.png").write_bytes(png_bytes(image))


def found_ratios(ctx, params: dict[str, float]) -> dict[str, float]:
    """Per-block ratios (MBW names, BASE included) of a trial's parameters."""
    return dict(ctx.space.recipe(params).ratios)


def sensitive_blocks(ctx, hidden: dict[str, float]) -> list[str]:
    """The blocks whose +-0.3 move from the hidden merge changes the demo's score by >= 1% of
    its range both ways (``toyworld.figures.sensitivity_of``, the toy world's acceptance rule;
    about 80 candidates; a move stops at the search's bounds, like a candidate). The others
    barely change the pictures: the score cannot find them, whatever the search. Leaves the
    scorer's references at the hidden merge's images."""
    def images(ratios: dict[str, float]):
        ctx.engine.apply(ctx.space.block_recipe(ratios))
        return generate(ctx.pipe, ctx.probes).images

    prompts = [job.prompt.text for job in ctx.probes.jobs()]
    return sensitivity_of(images, ctx.scorers[0], prompts, hidden, HIDDEN_SEED).sensitive()


def _rmse(errors: dict[str, float], blocks) -> float:
    return math.sqrt(sum(errors[b] ** 2 for b in blocks) / len(blocks)) if blocks else math.nan


def report(study, ctx, hidden: dict[str, float], hidden_score: float, out) -> dict:
    best = rf.best_trial(study)
    found = found_ratios(ctx, best.params)
    errors = {b: found[b] - hidden[b] for b in hidden}
    rmse = _rmse(errors, list(hidden))
    gap = (hidden_score - best.value) / abs(hidden_score)
    sensitive = sensitive_blocks(ctx, hidden)
    print("\nblock   hidden   found   error", file=out)
    for block in hidden:
        seen = "" if block in sensitive else "   (barely changes the pictures)"
        print(f"  {block:6s} {hidden[block]:6.3f}  {found[block]:6.3f}  {errors[block]:+6.3f}"
              f"{seen}", file=out)
    worst = sorted(errors, key=lambda b: -abs(errors[b]))[:3]
    print(f"ratio RMSE over all {len(hidden)} blocks: {rmse:.4f} (largest errors: "
          f"{', '.join(f'{b} {errors[b]:+.2f}' for b in worst)})", file=out)
    rmse_sensitive = _rmse(errors, sensitive)
    print(f"ratio RMSE over the {len(sensitive)} blocks that change the pictures (moving one by "
          f"0.3 changes the score by >= 1% of its range): {rmse_sensitive:.4f}", file=out)
    print("  (blocks that change the pictures alike cannot be told apart by any score either: "
          "benchmarks/search_quality.py counts the directions this score sees)", file=out)
    print(f"best score {best.value:.6f} (trial {best.number}); hidden merge's own score "
          f"{hidden_score:.6f}; gap {gap * 100:.3f}%", file=out)
    run = shlex.quote(str(Path(ctx.run.path).absolute()))
    print("\nnext:", file=out)
    print(f"  mergesearch status {run}", file=out)
    print(f"  mergesearch dashboard {run}      # http://127.0.0.1:8080", file=out)
    print(f"  mergesearch export {run} --best --to checkpoint --to comfyui", file=out)
    result = {"rmse": rmse, "rmse_sensitive": rmse_sensitive, "sensitive": sensitive,
              "best_score": best.value, "hidden_score": hidden_score,
              "gap": gap, "best_trial": best.number, "found": found, "hidden": dict(hidden),
              "trials": len(study.trials)}
    atomic_write_text(Path(ctx.run.path) / "demo_result.json", json.dumps(result, indent=2))
    return result
