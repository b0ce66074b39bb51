"""subtract: ``multiplier · (model1 - model2)``, the whole model (no ratios).

ComfyUI: ModelMergeSubtract (CLIPMergeSubtract on text encoders). No SuperMerger form.
"""

from __future__ import annotations

from ._method import SUBTRACT, MergeMethod, Node
from ._registry import register_method


@register_method
class Subtract(MergeMethod):
    name = "subtract"
    roles = ("model1", "model2")
    uses_ratio = False
    uses_multiplier = True
    formula = "multiplier·model1 - multiplier·model2"
    comfy = (Node(SUBTRACT, "model1", "model2", title="merge: multiplier*(model1 - model2)"),)
