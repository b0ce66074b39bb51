"""The toy world's pieces that need no trained weights: drawing, held-out prompts, the VAE's
latent rescaling, frozen unused token rows, data-parallel gradient averaging."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from merge_backend.pipeline import write_config_folder
from toyworld.draw import draw, random_scenes
from toyworld.train_diffusion import mask_unused_tokens
from toyworld.train_vae import standardise_latents
from toyworld.training import build, pictures_to_tensor, used_rows_only, world_token_ids
from toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    LOOKS,
    PLAIN,
    STYLE_A,
    STYLE_A_LOOKS,
    STYLE_B,
    STYLE_B_LOOKS,
    Style,
    Subject,
    all_subjects,
    caption,
    training_subjects,
)


def test_same_seed_same_pictures_and_held_out_prompts_never_trained():
    subjects = training_subjects()
    a = draw(random_scenes(np.random.default_rng(4), 16, subjects, STYLE_B))
    b = draw(random_scenes(np.random.default_rng(4), 16, subjects, STYLE_B))
    assert a.dtype == np.uint8 and a.shape == (16, 64, 64, 3) and np.array_equal(a, b)
    assert len(subjects) == len(all_subjects()) - len(HELD_OUT) == 40
    assert not set(HELD_OUT) & set(subjects)
    assert caption(HELD_OUT[0]) == "a red circle on a gray background"


def test_plain_pictures_hold_the_named_colours():
    """Corner pixels are the background's colour and the centre pixel the shape's (the shape
    is large and centred-ish), each within the per-picture colour jitter."""
    rng = np.random.default_rng(0)
    scenes = random_scenes(rng, 64, all_subjects(), PLAIN)
    pictures = draw(scenes).astype(int)
    for picture, subject in zip(pictures, scenes.subjects):
        assert np.abs(picture[0, 0] - BACKGROUNDS[subject.background]).max() <= 11
        assert np.abs(picture[32, 32] - COLOURS[subject.colour]).max() <= 11


def test_a_layout_puts_each_shape_where_it_says():
    """Each picture's shape, found by its colour (the pixels nearest the named colour), has its
    centre of mass within the layout's spread of the layout's centre and its size within the
    layout's radii: style A's shapes up-left and large, B's down-right and small."""
    from toyworld.draw import Layout

    subjects = [s for s in training_subjects() if s.shape == "circle" and s.background == "white"]
    for layout in (Layout((23.0, 23.0), 4.0, (17.0, 19.0)), Layout((41.0, 41.0), 4.0, (11.0, 13.0))):
        scenes = random_scenes(np.random.default_rng(5), 24, subjects, PLAIN, layout)
        for picture, subject in zip(draw(scenes).astype(float), scenes.subjects):
            mask = np.abs(picture - COLOURS[subject.colour]).max(-1) <= 40
            y, x = np.nonzero(mask)
            cx, cy = x.mean() + 0.5, y.mean() + 0.5
            assert abs(cx - layout.centre[0]) <= layout.spread + 0.5
            assert abs(cy - layout.centre[1]) <= layout.spread + 0.5
            radius = np.sqrt(mask.sum() / np.pi)  # a circle's area is pi r^2
            assert layout.radius[0] - 1 <= radius <= layout.radius[1] + 1


def test_styles_change_the_pictures_at_their_scale():
    rng = np.random.default_rng(1)
    subjects = [s for s in training_subjects() if s.background == "white"]
    plain = draw(random_scenes(np.random.default_rng(1), 32, subjects, PLAIN)).astype(float)
    warm = draw(random_scenes(np.random.default_rng(1), 32, subjects, STYLE_A)).astype(float)
    cool = draw(random_scenes(np.random.default_rng(1), 32, subjects, STYLE_B)).astype(float)
    red_minus_blue = [(p[..., 0] - p[..., 2]).mean() for p in (plain, warm, cool)]
    assert red_minus_blue[1] > red_minus_blue[0] + 20 > red_minus_blue[2] + 40
    # soft edges: fewer strong horizontal steps than the plain pictures; B's ring adds more
    steps = [(np.abs(np.diff(p.mean(-1), axis=2)) > 40).mean() for p in (plain, warm, cool)]
    assert steps[1] < steps[0] < steps[2]
    del rng


def _looks_by_torch(x: torch.Tensor, style: Style) -> torch.Tensor:
    """The looks of ``world.Style`` as their strengths are specified (contrast and saturation
    factors 1 +- 0.3 and 1 +- 0.5, gamma 1 -+ 0.3, a hue turn of 0.5 rad, a 5 px binomial blur,
    a stretch of 1.16, a vignette of 0.6, each times the style's strength), written with torch's
    own operations: the turn as a matrix exponential, the blur as a convolution, the stretch by
    affine_grid / grid_sample.
    ``x``: ``[N, 3, H, W]`` in [0, 1]."""
    grey = x.mean(1, keepdim=True)
    mean = grey.mean((2, 3), keepdim=True)
    x = (x - mean) * (1 + 0.3 * style.contrast) + mean
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * (1 + 0.5 * style.saturation)
    x = x.clamp(0, 1) ** (1 - 0.3 * style.light)
    k = torch.ones(3) / 3 ** 0.5
    generator = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    x = torch.einsum("ij,njhw->nihw", torch.linalg.matrix_exp(0.5 * style.hue * generator), x)
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    kernel = (taps[:, None] * taps[None]).expand(3, 1, 5, 5)
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)
    x = x + style.blur * (blurred - x)
    sx = 1 + 0.16 * max(style.stretch, 0.0)
    sy = 1 + 0.16 * max(-style.stretch, 0.0)
    theta = torch.tensor([[1 / sx, 0.0, 0.0], [0.0, 1 / sy, 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    centres = (torch.arange(64) + 0.5) / 32 - 1
    r2 = centres[None, :] ** 2 + centres[:, None] ** 2
    return x * (1 - 0.6 * style.vignette * r2 / 2)


def test_each_look_is_its_specified_operation():
    """``apply_looks`` on drawn pictures, each look alone at two strengths and the two
    styles' full sets, against the same operations written with torch (``_looks_by_torch``)."""
    from toyworld.draw import apply_looks

    scenes = random_scenes(np.random.default_rng(6), 6, training_subjects(), STYLE_B)
    plain = draw(scenes).astype(np.float32) / 255
    cases = [Style(**{name: value}) for name in LOOKS for value in (1.0, -0.6)
             if value > 0 or name in ("contrast", "saturation", "light", "stretch")]
    for style in [*cases, STYLE_A_LOOKS, STYLE_B_LOOKS]:
        got = apply_looks(plain.copy(), [style] * len(plain))
        want = _looks_by_torch(torch.from_numpy(plain).permute(0, 3, 1, 2), style)
        assert np.abs(got - want.permute(0, 2, 3, 1).numpy()).max() < 1e-4, style
    # and draw() applies a style's looks to the finished picture (up to its rounding)
    looked = draw(replace(scenes, styles=[STYLE_B_LOOKS] * len(scenes))).astype(np.float32)
    want = _looks_by_torch(torch.from_numpy(plain).permute(0, 3, 1, 2), STYLE_B_LOOKS)
    assert np.abs(looked - want.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).max() <= 2.0
    assert np.abs(looked - plain * 255).mean() > 10


def test_the_share_of_pictures_with_looks_is_the_plans():
    """``random_style(looks=share)``: about that share of styles have looks (2000 draws, within
    four standard deviations), none at 0; at 1 every style has them (bar the rare one whose
    looks all drew 0), and its own attributes come first in the stream, as without looks."""
    from toyworld.world import random_style

    for share in (0.0, 0.25, 0.5):
        rng = np.random.default_rng(3)
        with_looks = sum(random_style(rng, looks=share).has_looks() for _ in range(2000))
        assert abs(with_looks - 2000 * share) <= 4 * (2000 * share * (1 - share)) ** 0.5
    full, coin = np.random.default_rng(4), np.random.default_rng(4)
    styles = [random_style(full, looks=1.0) for _ in range(50)]
    assert sum(s.has_looks() for s in styles) >= 49
    first = random_style(coin)
    assert replace(styles[0], **dict.fromkeys(LOOKS, 0.0)) == first


def test_every_caption_fits_the_clips_context():
    """A caption with every style word and every look's word stays within the toy CLIP's
    context (the tokenizer would cut the last words off); each look has its own word."""
    from open_clip.tokenizer import SimpleTokenizer

    from toyworld.train_clip import CLIP_CONFIG
    from toyworld.world import styled_caption, vocabulary

    full = Style(warmth=1.0, soft=1.0, outline=1.0, texture=1.0,
                 **{name: 1.0 for name in LOOKS})
    longest = styled_caption(Subject("triangle", "yellow", "white"), full)
    assert len(SimpleTokenizer().encode(longest)) + 2 <= CLIP_CONFIG["text_cfg"]["context_length"]
    assert longest.endswith("bold vivid bright shifted blurry wide framed")
    words = [w for pair in LOOKS.values() for w in pair if w]
    assert len(set(words)) == len(words) and set(words) <= set(vocabulary(looks=True))
    assert not set(words) & set(vocabulary())


def test_latent_rescaling_changes_no_decoded_picture(tmp_path):
    config = write_config_folder("sd1", tmp_path / "config", size="tiny")
    torch.manual_seed(0)
    vae = build("vae", config).eval()
    pictures = pictures_to_tensor(draw(random_scenes(np.random.default_rng(2), 8,
                                                     training_subjects(), STYLE_A)))
    with torch.no_grad():
        before = vae.decode(vae.encode(pictures * 2 - 1).latent_dist.mean).sample
        c = standardise_latents(vae, pictures)
        latents = vae.encode(pictures * 2 - 1).latent_dist.mean
        after = vae.decode(latents).sample
    assert c != 1.0
    assert torch.allclose(before, after, atol=1e-4)
    # SD1's scaling factor now gives unit-variance latents on these pictures
    assert abs(float((latents * vae.config.scaling_factor).std()) - 1.0) < 1e-3


def test_unused_token_rows_are_zero_and_stay_zero(tmp_path):
    config = write_config_folder("sd1", tmp_path / "config", size="tiny")
    torch.manual_seed(0)
    te = build("te", config)
    mask_unused_tokens(te)
    weight = te.get_input_embeddings().weight
    used = torch.zeros(weight.shape[0], dtype=torch.bool)
    used[world_token_ids()] = True
    assert weight.used_rows.tolist() == world_token_ids()
    ids = torch.tensor([[49406, 320, 736, 7117, 49407] + [49407] * 72,
                        [49406, 1125, 3999, 49407] + [49407] * 73])  # 1125: not a world word
    with used_rows_only(te):
        opt = torch.optim.AdamW(te.parameters(), lr=1e-2, weight_decay=0.1)
        for _ in range(2):
            te(ids)[0].pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert te.get_input_embeddings().weight is weight  # the embedding is back, trained
    assert weight[~used].abs().max() == 0
    assert weight[used].abs().min() > 0
    assert 1125 not in world_token_ids() and 7117 in world_token_ids()  # "circle" is a word


def test_training_only_the_used_rows_steps_them_as_the_whole_masked_table(tmp_path):
    """The stand-in's rows against the plain way, written out here: the whole table trains
    and every unused row's gradient is multiplied by zero. Same steps, bit for bit, and the
    stand-in sends only the used rows to the optimiser."""
    config = write_config_folder("sd1", tmp_path / "config", size="tiny")
    ids = torch.tensor([[49406, 320, 736, 7117, 49407] + [49407] * 72,
                        [49406, 1125, 7117, 3999, 49407] + [49407] * 72])
    trained = []
    for stand_in in (False, True):
        torch.manual_seed(0)
        te = build("te", config)
        mask_unused_tokens(te)
        weight = te.get_input_embeddings().weight
        if not stand_in:
            keep = torch.zeros(weight.shape[0], 1)
            keep[world_token_ids()] = 1.0
            weight.register_hook(lambda grad, keep=keep: grad * keep)
        with used_rows_only(te) if stand_in else contextlib.nullcontext():
            params = list(te.parameters())
            opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
            for _ in range(3):
                te(ids)[0].pow(3).mean().backward()
                opt.step()
                opt.zero_grad()
        sizes = sorted(p.numel() for p in params)
        trained.append(te.state_dict())
    assert len(world_token_ids()) * 32 in sizes and weight.numel() not in sizes
    assert trained[0].keys() == trained[1].keys()
    for key, value in trained[0].items():
        assert torch.equal(value, trained[1][key]), key


def _average_in_process(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from toyworld.training import average_gradients

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    param = torch.nn.Parameter(torch.zeros(3))
    other = torch.nn.Parameter(torch.zeros(2, 2))
    frozen = torch.nn.Parameter(torch.zeros(2))  # no gradient: skipped
    param.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)
    other.grad = torch.full((2, 2), 10.0 * rank)
    average_gradients([param, frozen, other])
    torch.save({"param": param.grad, "other": other.grad, "frozen": frozen.grad},
               f"{out}.{rank}")
    dist.destroy_process_group()


def test_data_parallel_processes_take_the_mean_gradient(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "grad")
    mp.spawn(_average_in_process, args=(f"file://{tmp_path}/rendezvous", out), nprocs=2)
    for rank in (0, 1):
        grads = torch.load(f"{out}.{rank}", weights_only=True)
        assert torch.equal(grads["param"], torch.tensor([1.5, 3.0, 4.5]))
        assert torch.equal(grads["other"], torch.full((2, 2), 5.0))
        assert grads["frozen"] is None


def test_the_round_trip_is_the_vaes_own_decode_of_its_mean(tmp_path):
    """``through_vae`` against the round trip written out: the posterior's mean decoded, in
    uint8 levels (the build's house head and CLIP tuning learn from these)."""
    from toyworld.train_clip import through_vae

    config = write_config_folder("sd1", tmp_path / "config", size="toy16")
    torch.manual_seed(0)
    vae = build("vae", config).eval().requires_grad_(False)
    pictures = pictures_to_tensor(draw(random_scenes(np.random.default_rng(0), 6, all_subjects(),
                                                     PLAIN)))
    with torch.no_grad():
        plain = vae.decode(vae.encode(pictures * 2 - 1).latent_dist.mean).sample
    expected = ((plain.clamp(-1, 1) + 1) * 127.5).round()
    got = through_vae(vae, pictures, batch=4)
    assert got.dtype == torch.uint8 and got.shape == pictures.shape
    assert torch.equal(got.float(), expected)


def test_layout_captions_say_where_the_shape_is_and_how_big():
    """With layout words, every other CLIP caption also names the shape's place (a centre more
    than 4 px off the middle) and size (a radius from 16 px is large); their tokens become
    learnable only then, so a world without them keeps its CLIP's token rows."""
    from toyworld.draw import Scenes
    from toyworld.train_clip import captioned

    subject = training_subjects()[0]
    scenes = Scenes([subject] * 4, [PLAIN, PLAIN, STYLE_B, PLAIN],
                    centre=np.array([[20.0, 22.0], [44.0, 44.0], [44.0, 30.0], [32.0, 33.0]]),
                    radius=np.array([18.0, 12.0, 12.0, 16.0]), jitter=np.zeros((4, 2, 3)),
                    phase=np.zeros((4, 2)))
    plain = caption(subject)
    assert captioned(scenes) == [plain, plain, plain + ", cool, outlined, checkered", plain]
    assert captioned(scenes, layout=True) == [
        plain + ", large, top left", plain,
        plain + ", cool, outlined, checkered, small, right", plain]
    left = 1823  # the BPE id of "left" (open_clip's SimpleTokenizer)
    assert left in world_token_ids(layout=True) and left not in world_token_ids()
    assert set(world_token_ids()) < set(world_token_ids(layout=True))

