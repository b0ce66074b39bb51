"""Every built-in merge method passes the method contract (merge_backend/methods/contract.py)
against ComfyUI's own arithmetic, written out here (REFERENCE §1, §6; tests/comfyui_reference)."""

import pytest
import torch
from comfyui_reference import add_difference, patch

from merge_backend.methods import METHODS, MergeMethod, MethodError, register_method
from merge_backend.methods.contract import MergeMethodContract


class BuiltIn(MergeMethodContract):
    @pytest.fixture(scope="class")
    @classmethod
    def family(cls, tiny_sd1):
        return tiny_sd1


class TestWeightedSum(BuiltIn):
    method = "weighted_sum"

    def formula(self, tensors, ratio, multiplier):
        return patch(tensors[0], tensors[1], ratio, 1.0 - ratio)  # ModelMergeSimple


class TestSubtract(BuiltIn):
    method = "subtract"

    def formula(self, tensors, ratio, multiplier):
        return patch(tensors[0], tensors[1], multiplier, -multiplier)  # ModelMergeSubtract


class TestAdd(BuiltIn):
    method = "add"

    def formula(self, tensors, ratio, multiplier):
        return patch(tensors[0], tensors[1], 1.0, 1.0)  # ModelMergeAdd


class TestAddDifference(BuiltIn):
    method = "add_difference"

    def formula(self, tensors, ratio, multiplier):
        # ModelMergeSubtract(B, C, m) -> ModelMergeAdd(A, .) -> ModelMergeSimple(A, ., r)
        a, b, c = tensors
        return add_difference(a, b, c, multiplier, ratio)


# ---------------------------------------------------------------------------- beyond the contract


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(257, 3, generator=g, dtype=torch.float32) for _ in range(3)]


def test_the_built_ins_in_order():
    assert list(METHODS)[:4] == ["weighted_sum", "subtract", "add", "add_difference"]
    assert [METHODS[n].clip_node for n in ("weighted_sum", "subtract", "add")] == [
        "CLIPMergeSimple", "CLIPMergeSubtract", "CLIPMergeAdd"]
    assert METHODS["add_difference"].clip_node is None


def test_ratio_one_is_model1_unchanged(tensors):
    a, b, c = tensors
    assert torch.equal(METHODS["weighted_sum"].merge([a, b], 1.0), a)
    assert torch.equal(METHODS["add_difference"].merge([a, b, c], 1.0, 0.8), a)


def test_fast_is_one_lerp_in_the_working_dtype(tensors):
    w1, w2, w3 = tensors
    half = METHODS["weighted_sum"].merge([w1, w2], 0.37, arithmetic="fast",
                                         work_dtype=torch.float16)
    assert torch.equal(half, torch.lerp(w2.half(), w1.half(), 0.37))
    a = w1.half()
    target = (a.float() + (w2.half().float() - w3.half().float())).half()
    fast = METHODS["add_difference"].merge([w1, w2, w3], 0.25, 0.8, arithmetic="fast",
                                           work_dtype=torch.float16)
    assert torch.equal(fast, torch.lerp(a, target, 0.75 * 0.8))
    # the same sum as A + (1 - r) m (B - C), in another rounding order
    plain = w1 + 0.75 * 0.8 * (w2 - w3)
    torch.testing.assert_close(METHODS["add_difference"].merge([w1, w2, w3], 0.25, 0.8), plain,
                               rtol=1e-5, atol=1e-5)


def test_a_method_must_declare_enough_to_be_registered():
    class NoChain(MergeMethod):
        name = "no_chain"
        formula = "model1"

    with pytest.raises(MethodError, match="comfy.*or override exact"):
        register_method(NoChain)

    class NoReason(NoChain):
        def exact(self, tensors, ratio, multiplier):
            return tensors[0]

    with pytest.raises(MethodError, match="comfy_refusal"):
        register_method(NoReason)

    class BadRoles(NoReason):
        roles = ("model2", "model1")
        comfy_refusal = "none"

    with pytest.raises(MethodError, match="must start with model1"):
        register_method(BadRoles)

    class Twin(NoReason):
        name = "weighted_sum"
        comfy_refusal = "none"

    with pytest.raises(MethodError, match="already registered by .*WeightedSum"):
        register_method(Twin)
    assert "no_chain" not in METHODS
