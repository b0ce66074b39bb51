"""A merge as a diffusers pipeline folder, written offline and atomically.

The merge is written as a checkpoint (the same bytes ``merge_to_file`` gives) inside the
temporary folder, loaded with ``load_pipeline`` against a local config folder, saved with
``save_pretrained`` (safetensors) and the temporary folder renamed into place. Nothing is
fetched from a model hub.

Example:
    >>> export_diffusers(recipe, Path("out/merged-diffusers"), dtype="fp16")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merge_backend.atomic_files import atomic_folder
from merge_backend.merge_file import DTYPES, merge_to_file
from merge_backend.pipeline import load_pipeline
from merge_backend.recipe import Recipe


def export_diffusers(recipe: Recipe, folder: Path, *, dtype: str = "fp16",
                     config_folder: Path | None = None,
                     extra_metadata: Mapping[str, str] | None = None,
                     checkpoint: Path | None = None, replace: bool = True) -> Path:
    """Write ``recipe``'s merge as a diffusers pipeline folder at ``folder``.

    ``checkpoint``: an already merged file of this recipe (at ``dtype``) to load instead of
    merging again. ``config_folder``: the diffusers configs to load with (default: the built-in
    folder of the detected architecture and size). An existing ``folder`` is replaced; without
    ``replace`` (no ``--overwrite``), one that appeared meanwhile is kept and the export fails.
    """
    folder = Path(folder)
    with atomic_folder(folder, replace=replace) as tmp:
        source = checkpoint
        if source is None:
            source = tmp / "merged.safetensors"
            merge_to_file(recipe, source, dtype=dtype, extra_metadata=extra_metadata)
        pipe = _load_quietly(source, recipe.arch, config_folder, dtype)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        del pipe  # its weights may still map the merged file
        if checkpoint is None:
            source.unlink()
    return folder


def _load_quietly(checkpoint: Path, arch: str, config_folder: Path | None, dtype: str) -> Any:
    # An fp16 pipeline on the CPU makes diffusers warn that it cannot *run* there; it is only
    # being saved, so the warning would mislead.
    from diffusers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return load_pipeline(checkpoint, arch=arch, config_folder=config_folder,
                             dtype=DTYPES[dtype])
    finally:
        logging.set_verbosity(previous)
