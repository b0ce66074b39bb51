"""LoRAs: read any common format, apply to files and live pipelines, add, extract.

Every LoRA is read into one representation keyed by the ORIGINAL full weight key it changes
(``model.diffusion_model.…`` / ``cond_stage_model.transformer.…``), whatever its file calls the
module, so the file merge, the in-memory engine and the exporters meet LoRAs in the layout
they already use.

Example:
    >>> from merge_backend.lora import LoraUse, lora_deltas_for_key, read_lora
    >>> uses = [LoraUse(read_lora("style.safetensors", "sd1"), strength=0.8)]   # doctest: +SKIP
    >>> delta = lora_deltas_for_key(uses, "model.diffusion_model.out.2.weight")  # doctest: +SKIP
"""

from .add import add_loras
from .apply import (
    LoraUse,
    apply_to_pipeline,
    check_loras,
    lora_deltas_for_key,
    uses_from_recipe,
)
from .extract import ExtractResult, extract_lora
from .formats import LoraError, LoraFile, LoraModule, read_lora, save_lora
from .names import NameTable, Target, name_table
from .quality import ErrorTable, layer_errors
from .synthetic import random_lora

__all__ = [
    "ErrorTable", "ExtractResult", "LoraError", "LoraFile", "LoraModule", "LoraUse", "NameTable",
    "Target", "add_loras", "apply_to_pipeline", "check_loras", "extract_lora",
    "layer_errors", "lora_deltas_for_key", "name_table", "random_lora", "read_lora", "save_lora",
    "uses_from_recipe",
]
