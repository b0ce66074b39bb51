"""add: ``model1 + model2``, the whole model (no ratios, no multiplier).

ComfyUI: ModelMergeAdd (CLIPMergeAdd on text encoders). No SuperMerger form.
"""

from __future__ import annotations

from ._method import ADD, MergeMethod, Node
from ._registry import register_method


@register_method
class Add(MergeMethod):
    name = "add"
    roles = ("model1", "model2")
    uses_ratio = False
    formula = "model1 + model2"
    comfy = (Node(ADD, "model1", "model2", title="merge: model1 + model2"),)
