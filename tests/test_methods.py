"""Merge methods equal their formulas (ComfyUI's arithmetic, REFERENCE.md §1)."""

import pytest
import torch
from comfyui_reference import add_difference

from merge_backend import methods


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(257, 3, generator=g, dtype=torch.float32) for _ in range(3)]


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.731, 1.0])
def test_weighted_sum_is_comfyui_sequence_bit_exact(tensors, ratio):
    w1, w2, _ = tensors
    expected = w1.clone()
    expected *= ratio
    expected += (1 - ratio) * w2
    assert torch.equal(methods.weighted_sum(w1, w2, ratio), expected)
    assert torch.equal(methods.weighted_sum(w1, w2, 1.0), w1)  # ratio 1.0 = model1 unchanged


def test_weighted_sum_fp16_sources_computed_in_fp32(tensors):
    w1, w2 = (t.half() for t in tensors[:2])
    expected = w1.float() * 0.3
    expected += 0.7 * w2.float()
    out = methods.weighted_sum(w1, w2, 0.3)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_fast_arithmetic_agrees_to_float32_rounding(tensors):
    w1, w2, _ = tensors
    exact = methods.weighted_sum(w1, w2, 0.37)
    fast = methods.weighted_sum(w1, w2, 0.37, arithmetic="fast")
    torch.testing.assert_close(fast, exact, rtol=2e-6, atol=2e-6)
    # fast = one lerp over sources first cast to the working dtype
    half = methods.weighted_sum(w1, w2, 0.37, arithmetic="fast", work_dtype=torch.float16)
    assert torch.equal(half.half(), torch.lerp(w2.half(), w1.half(), 0.37))


def test_subtract_add(tensors):
    w1, w2, _ = tensors
    expected = w1 * 0.8
    expected += -0.8 * w2
    assert torch.equal(methods.subtract(w1, w2, 0.8), expected)
    assert torch.equal(methods.add(w1, w2), w1 + w2)


@pytest.mark.parametrize("ratio,multiplier", [(0.0, 1.0), (0.3, 0.8), (0.4, 0.7), (1.0, 0.8),
                                              (0.0, 0.8), (0.5, 0.0), (0.25, 1.5)])
def test_add_difference_is_comfyuis_node_chain(tensors, ratio, multiplier):
    a, b, c = tensors
    expected = add_difference(a, b, c, multiplier, ratio)
    assert torch.equal(methods.add_difference(a, b, c, ratio, multiplier), expected)
    assert torch.equal(methods.add_difference(a.half(), b.half(), c.half(), ratio, multiplier),
                       add_difference(a.half(), b.half(), c.half(), multiplier, ratio))
    # the same sum as A + (1 - r) m (B - C), in another rounding order
    plain = a + (1 - ratio) * multiplier * (b - c)
    torch.testing.assert_close(expected, plain, rtol=1e-5, atol=1e-5)
    fast = methods.add_difference(a, b, c, ratio, multiplier, arithmetic="fast")
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    if ratio == 1.0:
        assert torch.equal(methods.add_difference(a, b, c, ratio, multiplier), a)
