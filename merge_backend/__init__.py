"""merge_backend/: checkpoints in the users' layout, merge methods, and the merge engine.

It knows nothing of Optuna or scorers: it turns a ``Recipe`` into weights, in a file or in a
live diffusers pipeline.
"""

from .architectures import ARCHITECTURES, Architecture, UnsupportedModelError, block_names, block_of
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint
from .hashing import sha256_of
from .merge_file import MergeResult, merge_to_file, recipe_from_checkpoint
from .methods import METHODS, MergeMethod, register_method
from .plan import IncompatibleSourcesError, KeyPlan, MergePlan, plan_merge
from .recipe import ClipMerge, Recipe, RecipeError, Source

__all__ = [
    "ARCHITECTURES", "Architecture", "Checkpoint", "CheckpointError", "ClipMerge",
    "IncompatibleSourcesError", "KeyPlan", "METHODS", "MergeMethod", "MergePlan", "MergeResult",
    "Recipe", "RecipeError", "Source", "UnsupportedModelError", "block_names", "block_of",
    "merge_to_file", "open_checkpoint", "plan_merge", "recipe_from_checkpoint",
    "register_method", "sha256_of",
]
