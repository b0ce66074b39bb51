"""The trained toy world: shipped files in the users' layout that draw what they are asked for,
scorers that load through the real scorer code, and a build that trains from a seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from open_clip.tokenizer import SimpleTokenizer
from safetensors import safe_open

from evaluators import ProbeSet, build_scorer, generate
from merge_backend.architectures import ARCHITECTURES, detect_architecture
from merge_backend.pipeline import load_pipeline
from toyworld.draw import draw, random_scenes
from toyworld.files import (
    SHIPPED,
    WEIGHT_FILES,
    ToyWorld,
    world_layouts,
    world_styles,
    write_world,
)
from toyworld.world import (
    HOUSE,
    SAMPLING,
    SHAPES,
    STYLE_A,
    STYLE_B,
    Subject,
    caption,
    probe_subjects,
    training_subjects,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> ToyWorld:
    return write_world(tmp_path_factory.mktemp("toyworld"))


def test_shipped_files_are_small_fp16_single_files_in_the_users_layout(world):
    total = sum((SHIPPED / name).stat().st_size for name in WEIGHT_FILES)
    assert total < 40e6 and max((SHIPPED / n).stat().st_size for n in WEIGHT_FILES) < 20e6
    for name in ("base", "style_a", "style_b"):
        with safe_open(str(world.checkpoint(name)), framework="pt") as f:
            keys = list(f.keys())
            assert detect_architecture(keys).name == "sd1"
            dtypes = {f.get_slice(k).get_dtype() for k in keys}
        assert dtypes == {"F16", "I64"}  # position_ids stay int64, as in real files
        prefixes = [c.prefix for c in ARCHITECTURES["sd1"].components.values()]
        assert all(any(k.startswith(p) for p in prefixes) for k in keys)


def test_base_draws_the_shape_it_is_asked_for(world):
    """Through the normal checkpoint path (no config folder given: detected as the tiny SD1
    family); the trained CLIP scorer, zero-shot, names the shape of what the base drew."""
    from toyworld.figures import name

    pipe = load_pipeline(world.base)
    subjects = [Subject(shape, colour, "white")
                for shape, colour in zip(SHAPES, ("red", "blue", "yellow", "green"))]
    probes = ProbeSet(prompts=[caption(s) for s in subjects], seeds=[1, 2], batch_size=8,
                      **SAMPLING)
    images = generate(pipe, probes).images
    scorer = build_scorer({"kind": "clip", "model": str(world.clip_config),
                           "weights": str(world.clip_weights)}, device="cpu")
    named = name(scorer, images, "shape")
    asked = [subjects[job.prompt_index].shape for job in probes.jobs()]
    assert sum(n == a for n, a in zip(named, asked)) >= 7, (named, asked)
    # and the picture agrees with its own prompt better than with another shape's prompt
    own = scorer.score(images, [caption(subjects[j.prompt_index]) for j in probes.jobs()])
    other = scorer.score(images, [caption(subjects[(j.prompt_index + 1) % 4])
                                  for j in probes.jobs()])
    assert (own > other).float().mean() >= 0.75


def test_the_world_draws_from_the_noise_it_was_trained_to_remove(world, tmp_path):
    """The world's sizes space a sampler's steps "trailing": the first is the trained
    schedule's last timestep (999, SD1's scaled-linear betas written out here), so a 5-step
    draw spends no step at t = 1 and starts at full noise, as ComfyUI's schedules do. The
    random tiny family keeps SD1.5's "leading" spacing."""
    from diffusers import EulerDiscreteScheduler

    from evaluators.schedulers import make_scheduler
    from merge_backend.pipeline import write_config_folder

    steps = SAMPLING["steps"]
    pipe = load_pipeline(world.base)
    trailing = [float(t) for t in np.round(np.arange(1000, 0, -1000 / steps)) - 1]
    for sampler in ("euler", "dpm++_2m"):
        scheduler = make_scheduler(sampler, pipe.scheduler)
        scheduler.set_timesteps(steps)
        assert [float(t) for t in scheduler.timesteps] == trailing, sampler
    euler = make_scheduler("euler", pipe.scheduler)
    euler.set_timesteps(steps)
    alphas = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000,
                                              dtype=torch.float64) ** 2, 0)
    assert float(euler.sigmas[0]) == pytest.approx(float(((1 - alphas[-1]) / alphas[-1]) ** 0.5),
                                                   rel=1e-5)
    tiny = EulerDiscreteScheduler.from_pretrained(
        write_config_folder("sd1", tmp_path / "tiny", size="tiny") / "scheduler")
    tiny.set_timesteps(steps)
    leading = [float(t) for t in np.arange(steps)[::-1] * (1000 // steps) + 1]
    assert [float(t) for t in tiny.timesteps] == leading


def test_house_head_prefers_the_house_style_to_either_parent_style(world):
    """The LAION-format head loads through the laion_aesthetic scorer and ranks drawn pictures
    by the house style: A's palette with B's edges beats A's and B's looks. The target (half
    the warmth plus the outline) puts the house look 1.0 above either parent's; the head must
    keep at least half of that gap."""
    scorer = build_scorer({"kind": "laion_aesthetic", "model": str(world.clip_config),
                           "weights": str(world.clip_weights), "head": str(world.house_head)},
                          device="cpu")
    means = {}
    for label, style in (("house", HOUSE), ("a", STYLE_A), ("b", STYLE_B)):
        rng = np.random.default_rng(5)
        scenes = random_scenes(rng, 32, training_subjects(), style)
        pictures = torch.from_numpy(draw(scenes)).permute(0, 3, 1, 2).float() / 255
        means[label] = scorer.score(pictures, [""] * 32).mean().item()
    assert means["house"] > max(means["a"], means["b"]) + 0.5, means


def test_the_style_probe_learns_the_pictures_as_the_vae_returns_them(world):
    """``fit_style_probe(vae=...)`` embeds each drawn picture after the VAE's round trip. A
    real AutoencoderKL whose last decoder layer is zeroed returns the same mid-grey picture
    for every input: a probe fit through it has nothing to tell the styles apart by and gives
    every picture even odds, while the same fit without it tells A, B and plain apart."""
    from toyworld import figures
    from toyworld.training import build, pictures_to_tensor
    from toyworld.world import PLAIN

    vae = build("vae", world.config_folder).eval()
    with torch.no_grad():
        vae.decoder.conv_out.weight.zero_()
        vae.decoder.conv_out.bias.zero_()
    scorer = figures.clip_scorer(world)
    rng = np.random.default_rng(11)
    truth, pictures = [], []
    for label, style in (("plain", PLAIN), ("a", STYLE_A), ("b", STYLE_B)):
        pictures.append(pictures_to_tensor(draw(random_scenes(rng, 16, training_subjects(),
                                                              style))))
        truth += [label] * 16
    embeddings = scorer.image_embeddings(torch.cat(pictures))
    drawn = figures.fit_style_probe(scorer, per_style=48).classify(embeddings)
    assert np.mean([n == t for n, t in zip(drawn, truth)]) >= 0.9
    grey = figures.fit_style_probe(scorer, per_style=48, vae=vae)
    odds = torch.softmax(embeddings @ grey.weight.T + grey.bias, dim=-1)
    assert torch.allclose(odds, torch.full_like(odds, 1 / 3), atol=0.01), odds


def test_reference_scorer_is_one_for_the_same_pictures_and_lower_for_others(world):
    scorer = build_scorer({"kind": "reference", "model": str(world.clip_config),
                           "weights": str(world.clip_weights), "mode": "paired"}, device="cpu")
    rng = np.random.default_rng(0)
    a = torch.from_numpy(draw(random_scenes(rng, 4, training_subjects(), STYLE_A)))
    b = torch.from_numpy(draw(random_scenes(rng, 4, training_subjects(), STYLE_B)))
    a, b = (x.permute(0, 3, 1, 2).float() / 255 for x in (a, b))
    scorer.set_references(a)
    same = scorer.score(a, [""] * 4)
    assert torch.allclose(same, torch.ones(4), atol=1e-5)
    assert (scorer.score(b, [""] * 4) < 0.99).all()


def test_sensitivity_counts_the_blocks_that_change_the_pictures_and_no_other(world):
    """A made-up 'model' whose pictures depend on two blocks only: IN01 sets the warmth,
    OUT09 the outline. Only those two blocks may count, and each move's change is the
    reference score's own drop, written out here."""
    from toyworld import figures
    from toyworld.training import pictures_to_tensor

    subjects = probe_subjects()

    def images(ratios):
        style = replace(STYLE_A, warmth=2 * ratios["IN01"] - 1, outline=ratios["OUT09"])
        scenes = random_scenes(np.random.default_rng(0), len(subjects), subjects, style)
        return pictures_to_tensor(draw(replace(scenes, subjects=subjects)))

    scorer = figures.clip_scorer(world, "reference", mode="paired")
    hidden = figures.hidden_ratios(0)
    table = figures.sensitivity_of(images, scorer, [caption(s) for s in subjects], hidden,
                                   seed=0, random_merges=4)
    assert table.sensitive() == ["IN01", "OUT09"]
    unmoved = [b for b in figures.MBW if b not in ("IN01", "OUT09")]
    assert all(table.up[b] == table.down[b] == 0 for b in unmoved)
    reference = F.normalize(scorer.image_embeddings(images(hidden)), dim=-1)
    moved = F.normalize(scorer.image_embeddings(images({**hidden, "IN01": hidden["IN01"] + 0.3})),
                        dim=-1)
    base = (reference * reference).sum(-1).mean().item()  # 1 up to rounding
    expected = abs(base - (moved * reference).sum(-1).mean().item())
    assert table.up["IN01"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert table.score_range >= max(table.up["IN01"], table.down["OUT09"])


def test_directions_are_the_scorers_eigenvectors_and_their_drops_the_cosines_own():
    """A made-up embedding whose Jacobian at the hidden merge is U diag(sqrt(strength)) V^T
    (V a random rotation of the 26 ratios): the directions must be V's columns, strongest
    first, and moving 0.3 along direction k must lower the paired cosine by
    1 - 1 / sqrt(1 + 0.09 strength_k), written out here."""
    from toyworld import figures

    rng = np.random.default_rng(0)
    n = len(figures.MBW)
    rotation, _ = np.linalg.qr(rng.normal(size=(n, n)))
    strength = 2.0 ** -np.arange(n)  # distinct, strongest first
    spread = np.zeros((32, n))  # orthonormal columns, all orthogonal to the centre e_0
    spread[1:n + 1] = np.linalg.qr(rng.normal(size=(n, n)))[0]
    jacobian = spread @ np.diag(np.sqrt(strength)) @ rotation.T
    hidden = figures.hidden_ratios(3, 0.1, 0.9)
    centre = np.array([hidden[b] for b in figures.MBW])

    def embed(ratios):
        v = np.eye(32)[0] + jacobian @ (np.array([ratios[b] for b in figures.MBW]) - centre)
        return (v / np.linalg.norm(v))[None]

    def score(ratios):
        return float((embed(ratios) * embed(hidden)).sum())

    found = figures.directions_of(embed, score, hidden, score_range=1.0)
    alignment = np.abs((found.vectors * rotation).sum(axis=0))
    assert alignment == pytest.approx(np.ones(n), abs=1e-3)
    assert found.strength[:8] == pytest.approx(strength[:8], rel=1e-3)
    expected = 1 - 1 / np.sqrt(1 + 0.09 * strength)
    assert found.down == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert found.up == pytest.approx(expected, rel=1e-6, abs=1e-12)
    keep = [k for k in range(n) if expected[k] >= 0.01]  # strengths 1, 1/2, 1/4
    assert found.sensitive(0.01) == keep == [0, 1, 2]
    moved = centre + 0.2 * rotation[:, 0] + 0.1 * rotation[:, 2] + 0.3 * rotation[:, 5]
    rmse = found.rmse(dict(zip(figures.MBW, moved.tolist())), 0.01)
    assert rmse == pytest.approx(np.sqrt((0.2 ** 2 + 0.1 ** 2) / 3), rel=1e-6)
    again = figures.Directions.from_json(json.loads(json.dumps(found.to_json())))  # a cache
    assert again.sensitive(0.01) == keep
    assert again.rmse(dict(zip(figures.MBW, moved.tolist())), 0.01) == rmse


def test_cli_writes_the_world_and_a_study_config_that_validates(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "search.cli", "toyworld", str(tmp_path / "w")],
                         capture_output=True, text=True, env=env, check=True)
    paths = json.loads(out.stdout)
    for key in ("base", "style_a", "style_b", "clip_weights", "house_head", "study_config"):
        assert Path(paths[key]).is_file(), key
    assert (tmp_path / "w" / "base.safetensors").read_bytes() == \
        (SHIPPED / "base.safetensors").read_bytes()
    check = subprocess.run([sys.executable, "-m", "search.cli", "validate",
                            paths["study_config"]], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stderr
    assert "BASE" not in check.stdout.split("searched_parameters")[1].split("\n")[1]
    assert check.stdout.count("OUT11") >= 1


def tiny_plan(name: str):
    from toyworld.stages import PLANS

    plan = replace(PLANS[name], seed=3)
    return replace(plan, vae=replace(plan.vae, steps=2, pictures=32, batch=4),
                   clip=replace(plan.clip, steps=2, pictures=32, batch=8, tune_steps=2,
                                tune_pictures=16),
                   head=replace(plan.head, steps=2, pictures=32, batch=8),
                   base=replace(plan.base, steps=2, batch=8),
                   finetune=replace(plan.finetune, steps=2, batch=4),
                   pictures={"base": 32, "style_a": 16, "style_b": 16})


def test_a_few_step_build_writes_a_world_that_loads(tmp_path):
    """The build's two worker processes, data-parallel base included, end to end in a few
    steps of the first world's plan (8x8 latents; the shipped plan's few-step build is below);
    the result loads like the shipped world and differs from it (fresh training)."""
    from toyworld.build import build_world

    lines = []

    class Lines:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    from toyworld.build import BuildProgress, stage_steps

    plan = tiny_plan("first")
    world = build_world(tmp_path / "w", plan, progress=BuildProgress(stage_steps(plan), Lines()))
    assert not world.missing()
    assert not (tmp_path / "w" / "work").exists()
    assert any("100%" in line for line in lines)
    manifest = json.loads(world.manifest.read_text())
    assert manifest["plan"]["seed"] == 3 and set(manifest["stage_seconds"]) >= {"vae", "base"}
    assert "head_pictures" in manifest["stage_seconds"]  # run by one worker or the other
    pipe = load_pipeline(world.style_b, config_folder=world.config_folder)
    probes = ProbeSet(prompts=["a red circle on a white background"], seeds=[0], steps=2,
                      width=64, height=64)
    assert torch.isfinite(generate(pipe, probes).images).all()
    assert world.base.read_bytes() != (SHIPPED / "base.safetensors").read_bytes()


def test_a_stage_either_worker_may_run_goes_to_the_first_that_asks(tmp_path):
    """``Work.claim``: of two workers' views of one work folder, only the first to ask runs
    the stage, in this process or another."""
    from toyworld.stages import Work

    first, second = (Work(tmp_path, tmp_path, tmp_path / "clip.json") for _ in range(2))
    assert first.claim("head_pictures")
    assert not second.claim("head_pictures") and not first.claim("head_pictures")
    code = ("import sys; from pathlib import Path; from toyworld.stages import Work; "
            "w = Work(Path(sys.argv[1]), Path(sys.argv[1]), Path('c.json')); "
            "print(w.claim('head_pictures'), w.claim('latents_base'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parent.parent).stdout.split()
    assert out == ["False", "True"]
    assert not first.claim("latents_base")


@pytest.mark.parametrize("name", ["layout16", "layout16_mid", "shipped"])
def test_the_layout16_plan_builds_a_16x16_latent_world_that_loads_by_its_size(tmp_path, name):
    """A few steps of a layout world's plan: its files load through the normal checkpoint
    path with no config folder given (the size is told by the UNet's weight count), encode a
    64 px picture to a 16x16 latent (a 4x VAE: three blocks, two downsamples) and draw 64 px
    pictures; `toyworld DIR`'s copy of it keeps its config size and the plan's sampling. The
    "mid" plan's UNet has attention in its middle block only: in the users' layout, no
    transformer under input_blocks or output_blocks. The shipped plan's world says which
    styles its fine-tunes learned (what the style probe draws), and its CLIP learned the
    looks' words: their token embedding rows are not zero (the other plans': zero)."""
    from toyworld.build import BuildProgress, build_world, stage_steps
    from toyworld.figures import probe_set

    class Quiet:
        def write(self, text):
            pass

        def flush(self):
            pass

    sampling = {"steps": 6, "cfg": 4.0, "width": 64, "height": 64, "scheduler": "dpm++_2m"}
    plan = replace(tiny_plan(name), sampling=sampling)
    world = build_world(tmp_path / "w", plan, progress=BuildProgress(stage_steps(plan), Quiet()))
    pipe = load_pipeline(world.style_a)
    with safe_open(world.style_a, "pt") as f:
        transformers = {k.split(".")[2] for k in f.keys() if ".transformer_blocks." in k}
    if name == "layout16_mid":
        assert transformers == {"middle_block"}
        assert list(pipe.unet.config.down_block_types) == ["DownBlock2D"] * 4
    else:
        assert transformers == {"input_blocks", "middle_block", "output_blocks"}
    assert len(pipe.vae.config.down_block_types) == 3
    latent = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latent.shape == (1, 4, 64 // 2 ** 2, 64 // 2 ** 2)
    probes = ProbeSet(prompts=["a red circle on a white background"], seeds=[0], steps=2,
                      width=64, height=64)
    images = generate(pipe, probes).images
    assert images.shape[-2:] == (64, 64) and torch.isfinite(images).all()
    assert world_layouts(world.folder) == plan.layouts  # what the style probe draws with
    assert world_styles(world.folder) == plan.styles
    with safe_open(world.folder / "toyworld-clip.safetensors", "pt") as f:
        rows = f.get_tensor("token_embedding.weight")
    framed = SimpleTokenizer().encode("framed")  # the vignette's word, one token
    assert (rows[framed].abs().sum().item() > 0) == (name == "shipped")
    copy = write_world(tmp_path / "copy", source=world.folder)
    unet = json.loads((copy.config_folder / "unet" / "config.json").read_text())
    assert unet["sample_size"] == 16
    study = yaml.safe_load(copy.study_config.read_text())
    assert {k: study["probes"][k] for k in sampling} == sampling
    drawn = probe_set(copy, ["a red circle on a white background"], [1])
    assert {k: getattr(drawn, k) for k in sampling} == sampling


def test_the_same_head_saves_to_the_same_bytes(tmp_path):
    """A rebuild from the same seed must give byte-identical files (their sha256 go into every
    run's recipe), the house head's torch archive too."""
    from toyworld.files import save_torch

    head = {"w": torch.arange(6, dtype=torch.float16).reshape(2, 3)}
    save_torch(head, tmp_path / "one.pth")
    save_torch(head, tmp_path / "two.pth")
    assert (tmp_path / "one.pth").read_bytes() == (tmp_path / "two.pth").read_bytes()
    assert torch.equal(torch.load(tmp_path / "two.pth", weights_only=True)["w"], head["w"])


def test_the_toyworld_command_keeps_a_users_edits_unless_told(tmp_path, capsys):
    from search.cli import main

    world = tmp_path / "w"
    assert main(["toyworld", str(world)]) == 0
    study = world / "study.yaml"
    study.write_text(study.read_text().replace("trials: 200", "trials: 7"))
    edited = study.read_bytes()
    capsys.readouterr()
    assert main(["toyworld", str(world)]) == 1
    assert f"{world / 'base.safetensors'} exists; pass --overwrite" in capsys.readouterr().err
    assert study.read_bytes() == edited
    # a build refuses before it trains: here, because of an earlier build's work folder
    (tmp_path / "b" / "work").mkdir(parents=True)
    (tmp_path / "b" / "work" / "mine.txt").write_text("kept")
    assert main(["toyworld", "build", str(tmp_path / "b")]) == 1
    assert "work exists" in capsys.readouterr().err
    assert (tmp_path / "b" / "work" / "mine.txt").read_text() == "kept"
    # ... or because no plan has that name (before any folder is made)
    assert main(["toyworld", "build", str(tmp_path / "c"), "--plan", "layout61"]) == 1
    err = capsys.readouterr().err
    assert "--plan: unknown plan 'layout61'; known: shipped, first, layout16, " in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
    assert main(["toyworld", str(world), "--overwrite"]) == 0
    assert b"trials: 7" not in study.read_bytes()


def test_build_options_without_build_are_refused_not_ignored(tmp_path, capsys):
    """`--plan` (or --seed, --no-figures, --keep-work) names a build: given to the command
    that writes the shipped world, it would have done nothing, silently."""
    from search.cli import main

    for extra in (["--plan", "layout16"], ["--seed", "3"], ["--keep-work"], ["--no-figures"]):
        assert main(["toyworld", str(tmp_path / "w"), *extra]) == 1
        err = capsys.readouterr().err
        assert (f"{extra[0]} is an option of `mergesearch toyworld build DIR`" in err
                and len(err.strip().splitlines()) == 1), err
        assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", [["toyworld"], ["tiny"], ["toyworld", "build"]])
def test_an_interrupted_write_leaves_the_folder_as_it_was(tmp_path, command):
    """Ctrl-C while `mergesearch toyworld DIR` (or `tiny DIR`, or `toyworld build DIR`) writes:
    the files it had written go again (else only --overwrite would get past them), the user's
    own file stays, and the same command then succeeds. Interrupted after its first config
    file landed (the MERGESEARCH_PAUSE_AT hook), when the world's weights are already in place
    (toyworld), its checkpoints still to come (tiny), or its work folder made and the
    training not yet begun (build: not run again, that takes half an hour)."""
    import signal

    from child_signals import interruptible

    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    env = {**os.environ, "MERGESEARCH_PAUSE_AT": "after-rename"}
    argv = [sys.executable, "-m", "search.cli", *command, str(folder)]
    writer = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                              text=True, preexec_fn=interruptible)
    try:
        assert "paused at after-rename" in writer.stderr.readline()
        written = sorted(p.name for p in folder.iterdir())
        assert "config" in written, written  # interrupted mid-write
        assert command != ["toyworld"] or "base.safetensors" in written, written
        writer.send_signal(signal.SIGINT)
        writer.wait(timeout=60)
    finally:
        writer.kill()
        writer.stderr.close()
    assert writer.returncode != 0
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    env.pop("MERGESEARCH_PAUSE_AT")
    if "build" not in command:
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
