"""Probe sets: validation, prompt files, schedulers, and deterministic in-memory generation."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from evaluators import SCHEDULERS, ProbeSet, generate  # noqa: E402
from evaluators.schedulers import check_scheduler_name, make_scheduler  # noqa: E402
from merge_backend.pipeline import empty_pipeline  # noqa: E402

SMALL = {"steps": 3, "width": 64, "height": 64, "cfg": 5.0}
# diffusers' k-diffusion schedulers call np.array on tensors; numpy 2 warns on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")


@pytest.fixture(scope="module")
def sd15():
    return empty_pipeline("sd1", "tiny", seed=0)


@pytest.fixture(scope="module")
def probes() -> ProbeSet:
    # batch_size 3 over 4 images: one full and one partial batch.
    return ProbeSet(prompts=["a cat", {"text": "a dog on a beach", "weight": 2.0}],
                    seeds=[0, 1], batch_size=3, scheduler="euler_a", **SMALL)


@pytest.fixture(scope="module")
def drawn(sd15, probes):
    return generate(sd15, probes)


# --------------------------------------------------------------------------- generation


def test_generate_is_bit_identical_twice_on_cpu(sd15, probes, drawn):
    first, second = drawn, generate(sd15, probes)
    assert first.images.shape == (4, 3, 64, 64)
    assert first.images.dtype == torch.float32
    assert torch.equal(first.images, second.images)
    assert 0.0 <= first.images.min() and first.images.max() <= 1.0
    assert first.prompts == ["a cat"] * 2 + ["a dog on a beach"] * 2
    assert first.seeds == [0, 1, 0, 1]
    assert first.prompt_index == [0, 0, 1, 1]
    assert first.weights.tolist() == [1.0, 1.0, 2.0, 2.0]
    # Different seeds and different prompts give different images.
    assert not torch.equal(first.images[0], first.images[1])
    assert not torch.equal(first.images[0], first.images[2])


def test_an_image_depends_only_on_its_prompt_and_seed(sd15):
    both = ProbeSet(prompts=["a cat", "a dog"], seeds=[5, 9], batch_size=1, **SMALL)
    alone = ProbeSet(prompts=["a dog"], seeds=[9], batch_size=1, **SMALL)
    assert torch.equal(generate(sd15, both).images[3], generate(sd15, alone).images[0])


def test_batching_changes_images_by_float_noise_only(sd15, probes, drawn):
    batched = drawn.images
    single = generate(sd15, probes.model_copy(update={"batch_size": 1})).images
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-4)


def test_per_prompt_negative_overrides_the_probe_set_negative(sd15):
    shared = ProbeSet(prompts=["a cat"], negative_prompt="blurry", seeds=[3], batch_size=1, **SMALL)
    override = ProbeSet(prompts=[{"text": "a cat", "negative": "blurry"}], negative_prompt="dark",
                        seeds=[3], batch_size=1, **SMALL)
    plain = ProbeSet(prompts=["a cat"], seeds=[3], batch_size=1, **SMALL)
    with_shared = generate(sd15, shared).images
    assert torch.equal(with_shared, generate(sd15, override).images)
    assert not torch.equal(with_shared, generate(sd15, plain).images)


def test_generate_uses_the_named_scheduler_and_restores_the_pipelines(sd15, probes, drawn):
    own = sd15.scheduler
    euler = generate(sd15, probes.model_copy(update={"scheduler": "euler"})).images
    assert sd15.scheduler is own
    assert not torch.equal(drawn.images, euler)


def test_sdxl_pipeline_generates_deterministically():
    pipe = empty_pipeline("sdxl", "tiny", seed=0)
    probes = ProbeSet(prompts=["a cat", {"text": "a dog", "negative": "blurry"}], seeds=[0],
                      batch_size=2, **SMALL)
    first, second = generate(pipe, probes), generate(pipe, probes)
    assert first.images.shape == (2, 3, 64, 64)
    assert torch.equal(first.images, second.images)
    # SDXL zeroes an empty negative only per call, so a prompt without a negative is never
    # batched with one that has it: "a cat" comes out as it does alone.
    alone = generate(pipe, ProbeSet(prompts=["a cat"], seeds=[0], batch_size=2, **SMALL))
    assert torch.equal(first.images[0], alone.images[0])


def test_grid_tiles_one_row_per_prompt(drawn):
    grid = drawn.grid()
    assert grid.shape == (3, 2 * 64, 2 * 64)
    assert torch.equal(grid[:, 64:128, 64:128], drawn.images[3])


# --------------------------------------------------------------------------- schedulers


def test_every_scheduler_name_builds_its_class_with_explicit_variant_switches(sd15):
    karras_base = make_scheduler("dpm++_2m_karras", sd15.scheduler)
    for name, spec in SCHEDULERS.items():
        if any(importlib.util.find_spec(m) is None for m in spec.requires):
            with pytest.raises(ValueError, match=f"pip install {spec.requires[0]}"):
                check_scheduler_name(name)
            continue
        if spec.flow:  # flow samplers refuse a noise-prediction pipeline (tests/test_dit.py)
            with pytest.raises(ValueError, match="flow_euler"):
                make_scheduler("euler", make_scheduler(name, _flow_scheduler()))
            with pytest.raises(ValueError, match="noise-prediction"):
                make_scheduler(name, karras_base)
            continue
        # Built from a karras config, non-karras variants must still come out non-karras.
        scheduler = make_scheduler(name, karras_base)
        assert type(scheduler).__name__ == spec.class_name
        if "use_karras_sigmas" in spec.kwargs:
            assert scheduler.config.use_karras_sigmas == name.endswith("_karras"), name
    assert make_scheduler("dpm++_2m_karras", sd15.scheduler).config.algorithm_type == "dpmsolver++"


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


@pytest.mark.parametrize("name", ["euler", "dpm++_2m_karras", "ddim", "pndm"])
def test_common_schedulers_are_deterministic(sd15, name):
    probes = ProbeSet(prompts=["a cat"], seeds=[1], scheduler=name, **SMALL)
    first, second = generate(sd15, probes).images, generate(sd15, probes).images
    assert torch.equal(first, second)
    assert torch.isfinite(first).all()


# --------------------------------------------------------------------------- validation


def test_prompts_from_text_file_with_weights_and_comments(tmp_path: Path):
    (tmp_path / "prompts.txt").write_text(
        "# portraits\na portrait of a woman\n\n2.5 | a castle at night\na | b sign\n"
    )
    probes = ProbeSet(prompts=str(tmp_path / "prompts.txt"))
    assert [(p.text, p.weight) for p in probes.prompts] == [
        ("a portrait of a woman", 1.0), ("a castle at night", 2.5), ("a | b sign", 1.0)]


def test_probe_set_from_yaml_resolves_prompt_file_next_to_it(tmp_path: Path):
    (tmp_path / "prompts.yaml").write_text(
        "prompts:\n  - a cat\n  - {text: a dog, weight: 3, negative: blurry}\n")
    (tmp_path / "probes.yaml").write_text(
        "prompts: prompts.yaml\nseeds: [4, 8]\nsteps: 6\ncfg: 4.5\nwidth: 64\nheight: 128\n"
        "scheduler: dpm++_2m_karras\nbatch_size: 2\nnegative_prompt: lowres\n")
    probes = ProbeSet.from_yaml(tmp_path / "probes.yaml")
    assert [p.text for p in probes.prompts] == ["a cat", "a dog"]
    assert probes.prompts[1].weight == 3 and probes.prompts[1].negative == "blurry"
    assert (probes.seeds, probes.steps, probes.cfg, probes.height) == ([4, 8], 6, 4.5, 128)
    assert [(j.prompt_index, j.seed) for j in probes.jobs()] == [(0, 4), (0, 8), (1, 4), (1, 8)]


@pytest.mark.parametrize(("fields", "message"), [
    ({"scheduler": "euler_b"}, "unknown scheduler 'euler_b'"),
    ({"width": 100}, "multiple of 8"),
    ({"prompts": []}, "at least 1"),
    ({"prompts": [{"text": "a cat", "weight": 0}]}, "greater than 0"),
    ({"prompts": "no/such/prompts.txt"}, "prompt file no/such/prompts.txt does not exist"),
    ({"seeds": [-1]}, "seeds must be in"),
    ({"sampler": "euler"}, "Extra inputs are not permitted"),
])
def test_bad_probe_sets_fail_with_the_field_named(fields, message):
    data = {"prompts": ["a cat"], **fields}
    with pytest.raises(ValidationError, match=message):
        ProbeSet.model_validate(data)


def test_fingerprint_is_stable_and_tracks_settings():
    a = ProbeSet(prompts=["a cat"], seeds=[1, 2])
    assert a.fingerprint == ProbeSet(prompts=["a cat"], seeds=[1, 2]).fingerprint
    assert a.fingerprint != ProbeSet(prompts=["a cat"], seeds=[1, 3]).fingerprint
