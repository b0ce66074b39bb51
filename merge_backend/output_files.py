"""Checks on a path that a merge, an export or a LoRA is about to write."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
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


@contextlib.contextmanager
def removed_if_unfinished(folder: Path, outputs: Iterable[Path]) -> Iterator[None]:
    """Outputs written one by one into ``folder`` (files or folders): if the block fails or is
    interrupted, those of ``outputs`` it created are removed, and ``folder`` too if the block
    made it and it is left empty, so that running the command again finds the folder as it was
    (not half written, which only --overwrite would get past). What the block replaced stays
    replaced: --overwrite said the old files may go."""
    folder = Path(folder)
    outputs = [Path(p) for p in outputs]
    made_folder = not folder.exists()
    existed = {p for p in outputs if p.exists() or p.is_symlink()}
    try:
        yield
    except BaseException:
        for path in outputs:
            if path in existed:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise
