"""add_difference: model1 plus what model2 adds to base, ``A + (1 - ratio) · m · (B - C)``.

With ratio 0 this is the classic add-difference A + m (B - C); a per-block ratio blends each
block between A (ratio 1) and A + m (B - C) (ratio 0). ComfyUI computes it with the node chain
ModelMergeSubtract(B, C, m) -> ModelMergeAdd(A, .) -> the ratio node (A, ., ratio), i.e.
``ratio·A + (1 - ratio)·(A + (m·B - m·C))`` in float32, in that order; the comfy arithmetic
runs that chain step for step. SuperMerger: "Add difference", alpha = (1 - ratio) · m.
Fast: the target A + (B - C) is built once, each candidate is one lerp from A towards it.
"""

from __future__ import annotations

from ._method import ADD, RATIO, SUBTRACT, Lerp, MergeMethod, Node, SuperMerger, Target
from ._registry import register_method


@register_method
class AddDifference(MergeMethod):
    name = "add_difference"
    roles = ("model1", "model2", "base")
    uses_multiplier = True
    formula = "model1 + (1 - ratio)·multiplier·(model2 - base)"
    ratio_zero = "model1 + multiplier·(model2 − base)"
    comfy = (
        Node(SUBTRACT, "model2", "base", "difference", "difference: multiplier*(model2 - base)"),
        Node(ADD, "model1", "difference", "sum", "model1 + difference"),
        Node(RATIO, "model1", "sum", title="merge: ratio = model1's share"),
    )
    fast = Lerp(start="model1", end="target",
                weight=lambda ratio, multiplier: (1.0 - ratio) * multiplier,
                target=Target(("model1", "model2", "base"), lambda a, b, c: a + (b - c)))
    supermerger = SuperMerger(
        "Add difference", scaled_by_multiplier=True,
        text_encoder_refusal="SuperMerger's add-difference applies BASE as A + alpha*(B - C) to "
                             "the text encoder too; a weighted-sum text-encoder merge has no BASE "
                             "equivalent. Export it as a ComfyUI workflow instead")
