"""Plug-ins from other packages: entry points and ``"package.module:Name"`` import paths.

A package adds architectures, merge methods, scorers or samplers by naming them in its
``pyproject.toml``::

    [project.entry-points."mergesearch.methods"]
    clamped_difference = "my_package.methods:ClampedDifference"

Entry points are looked up only when a name is not built in (or when every name is listed), and
the scan is remembered for as long as ``sys.path`` is unchanged, so commands that use only
built-ins (``mergesearch merge``) never pay for it.

Example:
    >>> import_object("merge_backend.dtypes:DTYPES")["fp16"]
    torch.float16
"""

from __future__ import annotations

import pkgutil
import sys
from functools import lru_cache
from importlib import metadata
from typing import Any


class PluginError(ValueError):
    """A plug-in that cannot be loaded; the message names it and the cause."""


def entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    """The installed entry points of ``group`` by name (scanned once per ``sys.path``)."""
    return _scan(group, tuple(sys.path))


@lru_cache(maxsize=32)
def _scan(group: str, path: tuple[str, ...]) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def load_entry_point(group: str, name: str) -> Any | None:
    """The object entry point ``name`` of ``group`` names, or None when there is none."""
    ep = entry_points(group).get(name)
    if ep is None:
        return None
    try:
        return ep.load()
    except Exception as exc:  # noqa: BLE001 - any import failure of a plug-in is reported alike
        raise PluginError(f"entry point {name!r} ({group} = {ep.value}) cannot be loaded: "
                          f"{type(exc).__name__}: {exc}") from None


def is_import_path(name: str) -> bool:
    """Whether ``name`` is written ``package.module:Name``."""
    module, sep, attr = name.partition(":")
    return bool(sep and module and attr)


def import_object(path: str) -> Any:
    """The object ``package.module:Name`` names; PluginError naming what is missing."""
    if not is_import_path(path):
        raise PluginError(f"{path!r} is not an import path; write package.module:Name")
    try:
        return pkgutil.resolve_name(path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise PluginError(f"cannot import {path!r}: {type(exc).__name__}: {exc}") from None
