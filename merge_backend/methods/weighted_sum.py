"""weighted_sum: ``ratio · model1 + (1 - ratio) · model2`` per block.

ComfyUI: the vocabulary's ratio node (ModelMergeSimple, ModelMergeBlocks, ModelMergeSD1 / SD2 /
SDXL …; CLIPMergeSimple on text encoders). SuperMerger: "Weight sum", alpha = 1 - ratio.
Fast: one lerp from model2 to model1.
"""

from __future__ import annotations

from ._method import RATIO, Lerp, MergeMethod, Node, SuperMerger
from ._registry import register_method


@register_method
class WeightedSum(MergeMethod):
    name = "weighted_sum"
    roles = ("model1", "model2")
    formula = "ratio·model1 + (1 - ratio)·model2"
    comfy = (Node(RATIO, "model1", "model2", title="merge: ratio = model1's share"),)
    fast = Lerp(start="model2", end="model1", weight=lambda ratio, multiplier: ratio)
    supermerger = SuperMerger("Weight sum")
