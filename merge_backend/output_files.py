"""Checks on a path that a merge, an export or a LoRA is about to write."""

from __future__ import annotations

import os
from pathlib import Path

from merge_backend.partial_files import partial_name


def check_new_output(output: Path, overwrite: bool, error: type[Exception]) -> None:
    """``output`` may be written: absent (or a file ``overwrite`` replaces), in a folder that
    is one or can be made and takes new files: a bad path fails before the merge, not at its
    final rename."""
    if output.is_symlink() or output.exists():
        if output.is_dir():  # first: --overwrite would not help
            raise error(f"output {output} is a folder; name the file to write")
        if not overwrite:
            raise error(f"output {output} exists; pass --overwrite to replace it")
    check_output_folder(output, error)


def check_output_folder(output: Path, error: type[Exception]) -> None:
    """The folder ``output`` goes into is one (or can be made) and takes new files. Tried by
    making and removing a file under this process's temporary name: permissions alone do not
    tell (root passes them on a read-only mount or /proc)."""
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the first ancestor that exists: the rest is made
    if not folder.is_dir():
        raise error(f"output {output}: {folder} is not a folder")
    probe = folder / partial_name(f"{output.name}.probe")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise error(f"output {output}: cannot write in {folder} ({exc.strerror or exc})"
                    ) from None
