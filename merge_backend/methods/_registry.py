"""The merge-method registry: the built-ins, and other packages' ``mergesearch.methods`` entry
points (looked up only for names that are not built in)."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from functools import lru_cache

from merge_backend.plugins import entry_points, load_entry_point

from ._method import MergeMethod, MethodError, check_method

ENTRY_POINT_GROUP = "mergesearch.methods"
_REGISTERED: dict[str, MergeMethod] = {}


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a ``MergeMethod`` subclass known by its ``name``.

    Example:
        >>> @register_method                                  # doctest: +SKIP
        ... class Swap(MergeMethod):
        ...     name = "swap"
        ...     ...
    """
    method = _instance(cls, f"{cls!r}")
    known = _REGISTERED.get(method.name)
    if known is not None and type(known) is not type(method):
        raise MethodError(f"merge method {method.name!r} is already registered by "
                          f"{type(known).__module__}.{type(known).__name__}; give it another name")
    _REGISTERED[method.name] = method
    return cls


def _instance(obj: object, where: str) -> MergeMethod:
    method = obj() if isinstance(obj, type) and issubclass(obj, MergeMethod) else obj
    if not isinstance(method, MergeMethod):
        raise MethodError(f"{where} is not a MergeMethod subclass (merge_backend.methods)")
    check_method(method)
    return method


@lru_cache(maxsize=64)
def _plugin(name: str, path: tuple[str, ...]) -> MergeMethod | None:
    # cached per sys.path: a plug-in folder put on the path later is found
    obj = load_entry_point(ENTRY_POINT_GROUP, name)
    if obj is None:
        return None
    method = _instance(obj, f"entry point {name!r} ({ENTRY_POINT_GROUP})")
    if method.name != name:
        raise MethodError(f"entry point {name!r} ({ENTRY_POINT_GROUP}) names merge method "
                          f"{method.name!r}; the entry point's name must be the method's name")
    return method


class _Registry(Mapping[str, MergeMethod]):
    """Method name -> MergeMethod: built-ins first, then entry points."""

    def __getitem__(self, name: str) -> MergeMethod:
        if name in _REGISTERED:
            return _REGISTERED[name]
        method = _plugin(name, tuple(sys.path))
        if method is None:
            raise KeyError(f"unknown merge method {name!r}; known: {', '.join(self)}")
        return method

    def __iter__(self) -> Iterator[str]:
        yield from _REGISTERED
        yield from sorted(n for n in entry_points(ENTRY_POINT_GROUP) if n not in _REGISTERED)

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in _REGISTERED or name in entry_points(ENTRY_POINT_GROUP)


METHODS = _Registry()


def clip_methods() -> tuple[str, ...]:
    """The methods that also merge text encoders (one CLIPMerge node each)."""
    return tuple(name for name in METHODS if METHODS[name].clip_node is not None)
