"""`mergesearch export` end to end on a tiny SD1 study made with Optuna directly.

The trial's probe images come from the pipeline a study scores (model1's pipeline with the
candidate written in by MergeEngine); the exported files must reproduce them.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from safetensors import safe_open

from merge_backend import Recipe, Source, recipe_from_checkpoint
from merge_backend.engine import MergeEngine
from merge_backend.export import png_bytes
from merge_backend.merge_file import with_hashes
from merge_backend.pipeline import load_pipeline
from merge_backend.recipe import uniform_ratios
from search import cli
from search.run_folder import RunFolder, default_storage

PROBES = {"prompts": ["a red apple"], "seeds": [3], "steps": 2, "cfg": 5.0, "width": 64,
          "height": 64, "scheduler": "euler", "batch_size": 1}
FP16_TOLERANCE = 5e-3  # max |Δpixel|, images in [0, 1] (~1.3 of 255); measured 1.1e-3


def export(*argv: str) -> int:
    """`mergesearch export …` through the real entry point."""
    return cli.main(["export", *map(str, argv), "--quiet"])


def draw(pipe) -> torch.Tensor:
    """The probe images, drawn after every weight is copied to fresh memory.

    A pipeline loaded from a file holds its weights at the file's byte offsets (4-byte aligned),
    the engine's at 64-byte aligned ones; some CPU kernels (seen with one thread) take another
    path on unaligned data and round differently, so the same bits could draw images that differ
    in the last place. The copy changes no value.
    """
    from evaluators import ProbeSet, generate

    with torch.no_grad():
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for tensor in (*module.parameters(), *module.buffers()):
                    tensor.data = tensor.data.clone()
    return generate(pipe, ProbeSet.model_validate(PROBES)).images


def _recipe(fam, in04: float, base: float) -> Recipe:
    ratios = uniform_ratios("sd1", "mbw", 0.6)
    ratios.update(IN04=in04, OUT02=0.1, BASE=base)
    models = {"model1": Source(str(fam.a)), "model2": Source(str(fam.b))}
    return with_hashes(Recipe(arch="sd1", method="weighted_sum", models=models,
                              vocabulary="mbw", ratios=ratios))


def make_run(path: Path, recipes: list[Recipe], values: list, *, directions=("maximize",),
             grid: bytes | None = None, probe_set: dict | None = PROBES) -> RunFolder:
    run = RunFolder(path, "tiny-study", default_storage(path))
    run.save()
    study = optuna.create_study(study_name=run.study_name, storage=run.storage,
                                directions=list(directions))
    if probe_set:
        study.set_user_attr("probe_set", probe_set)
    for i, (recipe, value) in enumerate(zip(recipes, values)):
        trial = study.ask()
        trial.set_user_attr("recipe", recipe.to_dict())
        trial.set_user_attr("scores", {"clip": 20.0 + i, "aesthetic": 5.0})
        if grid is not None and i == 0:
            png = path / "grid.png"
            png.write_bytes(grid)
            artifact = optuna.artifacts.upload_artifact(
                artifact_store=run.artifact_store(), file_path=str(png), study_or_trial=trial,
                mimetype="image/png")
            trial.set_user_attr("artifact:probes", artifact)
        study.tell(trial, value)
    return run


@pytest.fixture(scope="module")
def scored(tiny_sd1, tmp_path_factory):
    """A study whose best trial was scored on these images (MergeEngine in model1's pipeline)."""
    recipe = _recipe(tiny_sd1, 0.2, 0.4)
    pipe = load_pipeline(tiny_sd1.a, config_folder=tiny_sd1.config_folder)
    MergeEngine(pipe, recipe).apply(recipe)
    images = draw(pipe)
    run = make_run(tmp_path_factory.mktemp("run"), [recipe, _recipe(tiny_sd1, 0.9, 1.0)],
                   [2.0, 1.0], grid=png_bytes(images[0]))
    return run, recipe, images


def test_exported_checkpoint_and_folder_reproduce_the_scored_images(scored, tiny_sd1,
                                                                    tmp_path):
    run, recipe, images = scored
    out = tmp_path / "fp32"
    assert export(run.path, "--best", "--to", "checkpoint", "--to", "diffusers",
                  "--dtype", "fp32", "-o", out, "--config-folder", tiny_sd1.config_folder) == 0
    ckpt = out / "tiny-study-trial0.safetensors"
    assert torch.equal(draw(load_pipeline(ckpt, config_folder=tiny_sd1.config_folder)), images)
    from diffusers import StableDiffusionPipeline

    folder = StableDiffusionPipeline.from_pretrained(out / "tiny-study-trial0-diffusers",
                                                     local_files_only=True)
    folder.set_progress_bar_config(disable=True)
    assert torch.equal(draw(folder), images)
    # The metadata round-trips to the trial's Recipe and names the study, trial and scores.
    assert recipe_from_checkpoint(ckpt) == recipe
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    assert (meta["mergesearch.study"], meta["mergesearch.trial"]) == ("tiny-study", "0")
    assert json.loads(meta["mergesearch.scores"]) == {"clip": 20.0, "aesthetic": 5.0}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"

    half = tmp_path / "half.safetensors"
    assert export(run.path, "--trial", "0", "--to", "checkpoint", "-o", half) == 0
    drawn = draw(load_pipeline(half, config_folder=tiny_sd1.config_folder))
    assert 0 < (drawn - images).abs().max().item() < FP16_TOLERANCE


def test_text_exports_and_report(scored, tiny_sd1, tmp_path):
    run, recipe, images = scored
    assert export(run.path, "--to", "comfyui", "--to", "mbw", "--to", "report",
                  "--config-folder", tiny_sd1.config_folder, "--device", "cpu") == 0
    out = run.exports
    mbw = (out / "tiny-study-trial0.mbw.txt").read_text().strip()
    assert mbw.split(",")[:6] == ["0.6", "0.4", "0.4", "0.4", "0.4", "0.8"]  # BASE, IN00..IN04
    api = json.loads((out / "tiny-study-trial0.comfyui.api.json").read_text())
    ui = json.loads((out / "tiny-study-trial0.comfyui.json").read_text())
    assert {n["class_type"] for n in api.values()} >= {"ModelMergeSD1", "CLIPMergeSimple"}
    assert ui["extra"]["mergesearch"]["recipe"] == json.loads(recipe.to_json())
    sampler = next(n for n in api.values() if n["class_type"] == "KSampler")["inputs"]
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (3, 2, 5.0)
    assert "a red apple" in {n["inputs"].get("text") for n in api.values()}

    page = (out / "tiny-study-trial0.report.html").read_text()
    probes, top = page.split("<h2>Probe images</h2>")[1].split("<h2>The study's top")
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', probes)
    assert len(pngs) == 3  # model1, the candidate (the stored probe grid), model2
    # the study's top trials (both completed) side by side, with their stored grids
    assert re.findall(r'src="data:image/png;base64,([^"]+)"', top)[0] == pngs[1]
    assert "<h3>trial 0</h3>" in top and "<h3>trial 1</h3>" in top
    import base64

    assert base64.b64decode(pngs[1]) == png_bytes(images[0])
    assert len({*pngs}) == 3
    assert "<svg" in page and "IN04: 0.2" in page and "aesthetic" in page
    assert json.dumps(recipe.to_dict(), indent=2, sort_keys=True).replace('"', "&quot;") in page
    assert "src=\"http" not in page and "<script" not in page


def test_pareto_exports_k_trials_named_by_number(tiny_sd1, tmp_path):
    recipes = [_recipe(tiny_sd1, r, 1.0) for r in (0.1, 0.2, 0.3, 0.4)]
    run = make_run(tmp_path / "run", recipes, [[1, 4], [2, 3], [0, 0], [3, 1]],
                   directions=("maximize", "maximize"), probe_set=None)
    assert export(run.path, "--pareto", "2", "--to", "mbw", "-o", tmp_path / "o") == 0
    written = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert written == ["tiny-study-trial0.mbw.txt", "tiny-study-trial1.mbw.txt"]
    assert (tmp_path / "o" / written[1]).read_text().split(",")[5] == "0.8"  # IN04 = 0.2


def test_recipe_and_checkpoint_sources(scored, tmp_path):
    _, recipe, _ = scored
    recipe_file = tmp_path / "my-merge.json"
    recipe_file.write_text(recipe.to_json())
    assert export(recipe_file, "--to", "checkpoint", "--dtype", "fp32") == 0
    ckpt = tmp_path / "exports" / "my-merge.safetensors"
    assert recipe_from_checkpoint(ckpt) == recipe
    assert export(ckpt, "--to", "mbw", "-o", tmp_path / "from-ckpt.txt") == 0
    assert export(recipe_file, "--to", "mbw", "-o", tmp_path / "from-json.txt") == 0
    assert (tmp_path / "from-ckpt.txt").read_text() == (tmp_path / "from-json.txt").read_text()
    assert export(recipe_file, "--to", "mbw", "-o", tmp_path / "from-json.txt") == 1


def _stale_run(tiny_sd1, tmp_path: Path) -> Path:
    copy = tmp_path / "finetune_b.safetensors"
    shutil.copy(tiny_sd1.b, copy)
    recipe = _recipe(tiny_sd1, 0.5, 1.0)
    recipe = recipe.replace(models={**recipe.models, "model2": Source(str(copy))})
    run = make_run(tmp_path / "run", [with_hashes(recipe)], [1.0])
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # the file changes after the study ran
    copy.write_bytes(bytes(data))
    return run.path


def _no_trial_run(tiny_sd1, tmp_path: Path) -> Path:
    run = make_run(tmp_path / "run", [], [])
    study = run.study()
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    return run.path


def _missing_source(tiny_sd1, tmp_path: Path) -> Path:
    recipe = _recipe(tiny_sd1, 0.5, 1.0)
    recipe = recipe.replace(models={**recipe.models, "model2": Source(str(tmp_path / "gone.st"))})
    path = tmp_path / "recipe.json"
    path.write_text(recipe.to_json())
    return path


@pytest.mark.parametrize("make,message", [
    (_no_trial_run, "no completed trial"),
    (_missing_source, r"model2: source .*gone.st is missing"),
    (_stale_run, r"model2: .*finetune_b.safetensors changed since the merge was scored"),
])
def test_refusals_write_nothing(make, message, tiny_sd1, tmp_path, capsys):
    source = make(tiny_sd1, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    out = tmp_path / "out"
    code = export(source, "--to", "checkpoint", "--to", "comfyui", "--to", "mbw",
                  "-o", out)
    assert code == 1
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("edit,field", [
    (lambda d: [1], "recipe: expected an object, got list"),
    (lambda d: None, "recipe: expected an object, got NoneType"),
    (lambda d: {**d, "models": [1]}, "recipe.models: expected an object, got list"),
    (lambda d: {**d, "models": {"model1": 1}}, "recipe.models.model1: expected an object"),
    (lambda d: {**d, "ratios": [1]}, "recipe.ratios: expected an object, got list"),
    (lambda d: {**d, "ratios": {**d["ratios"], "IN04": "abc"}}, "recipe.ratios['IN04']: 'abc'"),
    (lambda d: {**d, "loras": 3}, "recipe.loras: expected a list, got int"),
    (lambda d: {k: v for k, v in d.items() if k != "models"}, "no 'models' field"),
])
def test_a_malformed_recipe_file_names_the_field(tiny_sd1, tmp_path, capsys, edit, field):
    """Each of these ended in a TypeError or AttributeError traceback, or a line naming no
    field ('could not convert string to float')."""
    source = tmp_path / "recipe.json"
    source.write_text(json.dumps(edit(_recipe(tiny_sd1, 0.5, 1.0).to_dict())))
    assert export(source, "--to", "mbw", "-o", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mergesearch: error: {source}: not a Recipe file") and field in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_a_lora_of_an_architecture_no_format_names_is_refused_while_planning(
        tiny_flux1, tmp_path, capsys, fmt):
    """Flux.1 (fused qkv): refused before the checkpoint beside it is merged and written (the
    extraction found it after)."""
    recipe = with_hashes(Recipe(arch="flux1", method="weighted_sum", vocabulary="single",
                                ratios={"all": 0.5}, models={"model1": Source(str(tiny_flux1.a)),
                                                             "model2": Source(str(tiny_flux1.b))}))
    source = tmp_path / "recipe.json"
    source.write_text(recipe.to_json())
    out = tmp_path / "out"
    assert export(source, "--to", "checkpoint", "--to", "lora", "--base", tiny_flux1.base,
                  "--lora-format", fmt, "-o", out) == 1
    err = capsys.readouterr().err
    assert f"--to lora: {tiny_flux1.base}: a {fmt}-format LoRA has no name for" in err, err
    assert not out.exists()


@pytest.mark.parametrize("name,fmt", [("run.json", "comfyui"), ("artifacts/x.json", "comfyui")])
def test_an_export_never_writes_over_the_runs_own_records(scored, name, fmt, capsys):
    """`export RUN --to comfyui -o RUN/run.json --overwrite` replaced the run's run.json (the
    run then could not be read); its sources were protected, its own files were not."""
    run = scored[0]
    target = run.path / name
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    assert export(run.path, "--to", fmt, "-o", target, "--overwrite") == 1
    err = capsys.readouterr().err
    assert f"output {target} is a source file or inside a source folder" in err, err
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == before


def test_png_bytes_round_trip():
    # png_bytes writes a PNG PIL reads back pixel for pixel.
    from PIL import Image

    image = torch.rand(3, 8, 16)
    back = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png_bytes(image)))))  # HWC
    assert torch.equal(back.permute(2, 0, 1), (image * 255).round().to(torch.uint8))


def test_sources_kept_in_another_folder_are_found_with_sources(tiny_sd1, tmp_path, capsys):
    """A run folder taken to another machine whose models live in another folder: `--sources
    DIR` finds each source by the file name its Recipe recorded, and the recorded sha256 proves
    it is the same file (a different file of that name is refused)."""
    from types import SimpleNamespace

    here = tmp_path / "models"
    here.mkdir()
    fam = SimpleNamespace(a=Path(shutil.copy(tiny_sd1.a, here / "a.safetensors")),
                          b=Path(shutil.copy(tiny_sd1.b, here / "b.safetensors")))
    run = make_run(tmp_path / "run", [_recipe(fam, 0.2, 0.4)], [1.0])
    assert export(run.path, "--best", "--to", "mbw", "-o", tmp_path / "before.txt") == 0
    elsewhere = tmp_path / "elsewhere"
    shutil.move(here, elsewhere)
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert export(run.path, "--best", "--to", "mbw", "-o", tmp_path / "x.txt") == 1
    err = capsys.readouterr().err
    assert str(here / "a.safetensors") in err and "--sources" in err, err
    assert export(run.path, "--best", "--to", "mbw", "-o", tmp_path / "after.txt",
                  "--sources", tmp_path / "empty", "--sources", elsewhere) == 0
    assert (tmp_path / "after.txt").read_text() == (tmp_path / "before.txt").read_text()
    assert cli.main(["compare", str(run.path), "--trials", "0", "-o", str(tmp_path / "c.html"),
                     "--sources", str(elsewhere)]) == 0
    assert (tmp_path / "c.html").read_text().startswith("<!DOCTYPE html>")
    shutil.copy(tiny_sd1.base, elsewhere / "b.safetensors")  # another file, the same name
    capsys.readouterr()
    assert export(run.path, "--best", "--to", "mbw", "-o", tmp_path / "y.txt",
                  "--sources", elsewhere) == 1
    assert "changed since the merge was scored" in capsys.readouterr().err
    for command in (["export", str(run.path), "--best", "--to", "mbw"], ["compare", str(run.path),
                                                                         "--trials", "0"]):
        assert cli.main([*command, "--sources", str(tmp_path / "nowhere")]) == 1
        assert f"--sources {tmp_path / 'nowhere'}: not a folder" in capsys.readouterr().err


def test_a_moved_run_folder_reads_its_own_database(tiny_sd1, tmp_path, capsys):
    """A run folder copied or moved elsewhere (another disk, a colleague's machine) keeps its
    SQLite database inside: status, best and export read it there, and read what the folder
    held before the move."""
    from search.cli import main

    run = make_run(tmp_path / "here" / "run", [_recipe(tiny_sd1, 0.2, 0.4),
                                               _recipe(tiny_sd1, 0.9, 1.0)], [1.0, 2.0])
    assert export(run.path, "--best", "--to", "mbw", "-o", tmp_path / "before.txt") == 0
    before = optuna.load_study(study_name=run.study_name, storage=run.storage).trials
    moved = tmp_path / "elsewhere" / "renamed-run"
    moved.parent.mkdir()
    shutil.move(run.path, moved)
    assert not run.path.exists()
    loaded = RunFolder.load(moved)
    assert [(t.number, t.value, t.user_attrs) for t in loaded.study().trials] == \
        [(t.number, t.value, t.user_attrs) for t in before]
    assert export(moved, "--best", "--to", "mbw", "-o", tmp_path / "after.txt") == 0
    assert (tmp_path / "after.txt").read_text() == (tmp_path / "before.txt").read_text()
    capsys.readouterr()
    assert main(["status", str(moved)]) == 0
    assert "best: trial 1" in capsys.readouterr().out
    assert not run.path.exists()  # reading it did not make an empty database at the old path
    # A copy reads its own database, not the one it was copied from.
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    study = RunFolder.load(moved).study()
    study.tell(study.ask(), 3.0)
    assert len(RunFolder.load(moved).study().trials) == 3
    assert len(RunFolder.load(copy).study().trials) == 2
    # run.json written before it said so (no storage_in_folder): read in the moved folder too
    meta = json.loads((copy / "run.json").read_text())
    assert meta.pop("storage_in_folder") == "study.db"
    (copy / "run.json").write_text(json.dumps({**meta, "storage": run.storage}))
    shutil.move(copy, tmp_path / "old-style")
    assert len(RunFolder.load(tmp_path / "old-style").study().trials) == 2
