"""Merge methods: one small file each in this folder, registered by ``@register_method``.

A method (``MergeMethod``, see ``_method.py``) carries its roles, formula, ComfyUI node chain
(which is also its exact arithmetic), fast kernel shape, SuperMerger meaning and checks; the
file merge, the engine, the Recipe's validation and every export read them from here. Built in:
``weighted_sum``, ``subtract``, ``add``, ``add_difference``. Another package adds its own with a
``mergesearch.methods`` entry point naming its ``MergeMethod`` subclass; ``contract.py`` holds
the tests every method must pass (README.md in this folder: how to write one).

Example:
    >>> import torch
    >>> METHODS["add_difference"].roles
    ('model1', 'model2', 'base')
    >>> METHODS["subtract"].merge([torch.ones(2), torch.zeros(2)], multiplier=0.5)
    tensor([0.5000, 0.5000])
"""

from ._method import (
    ADD,
    F32,
    NODE_KINDS,
    RATIO,
    SUBTRACT,
    TARGET,
    Lerp,
    MergeMethod,
    MethodError,
    Node,
    NodeKind,
    SuperMerger,
    Target,
    lerp_fast,
    patch,
)
from ._registry import ENTRY_POINT_GROUP, METHODS, clip_methods, register_method

# the built-ins register themselves when imported (in the order `mergesearch` lists them)
from . import weighted_sum, subtract, add, add_difference  # noqa: E402, F401, I001  isort: skip

__all__ = [
    "ADD", "ENTRY_POINT_GROUP", "F32", "METHODS", "NODE_KINDS", "RATIO", "SUBTRACT", "TARGET",
    "Lerp", "MergeMethod", "MethodError", "Node", "NodeKind", "SuperMerger", "Target",
    "clip_methods", "lerp_fast", "patch", "register_method",
]
