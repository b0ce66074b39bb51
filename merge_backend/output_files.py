"""Checks on a path that a merge, an export or a LoRA is about to write."""

from __future__ import annotations

from pathlib import Path


def check_new_output(output: Path, overwrite: bool, error: type[Exception]) -> None:
    """``output`` may be written: absent (or a file ``overwrite`` replaces), in a folder that
    is one or can be made: a bad path fails before the merge, not at its final rename."""
    if output.is_symlink() or output.exists():
        if not overwrite:
            raise error(f"output {output} exists; pass --overwrite to replace it")
        if output.is_dir():
            raise error(f"output {output} is a folder; name the file to write")
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the first ancestor that exists: the rest is made
    if not folder.is_dir():
        raise error(f"output {output}: {folder} is not a folder")
