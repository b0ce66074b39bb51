"""A merge method ComfyUI's nodes cannot express: move model1 towards model2 by at most
``multiplier`` per weight."""

from __future__ import annotations

import torch

from merge_backend.methods import MergeMethod
from merge_backend.recipe import RecipeError


class ClampedDifference(MergeMethod):
    name = "clamped_difference"
    roles = ("model1", "model2")
    uses_multiplier = True
    formula = "model1 + (1 - ratio)·clamp(model2 - model1, ±multiplier)"
    ratio_zero = "model1 moved towards model2 by at most the multiplier per weight"
    comfy_refusal = "ComfyUI has no merge node that clamps a difference"

    def exact(self, tensors, ratio, multiplier):
        a, b = tensors
        bound = abs(multiplier)
        return a + (1.0 - ratio) * torch.clamp(b - a, -bound, bound)

    def check(self, recipe):
        if recipe.multiplier <= 0:
            raise RecipeError(f"recipe.multiplier = {recipe.multiplier}: clamped_difference "
                              "needs a positive bound")
