"""Config errors a person can act on: every problem at once, each with its full field path.

pydantic reports locations as tuples (``('scorers', 0, 'weights')``), union members as extra
location parts (``('merge', 'multiplier', 'float')``) and unknown keys as "Extra inputs are not
permitted". ``problems`` turns a ValidationError into ``(path, message)`` pairs such as
``("scorers[0].weights", "weights file /x.pt does not exist")`` or
``("trails", "unknown key (did you mean trials?)")``.

Example:
    >>> from pydantic import BaseModel, ConfigDict, ValidationError
    >>> class M(BaseModel):
    ...     model_config = ConfigDict(extra="forbid")
    ...     trials: int = 1
    >>> try:
    ...     M.model_validate({"trails": 3})
    ... except ValidationError as exc:
    ...     problems(exc, M)
    [('trails', 'unknown key (did you mean trials?)')]
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

# A validator message that starts with a field path relative to its model ("bounds: …",
# "grace_seconds: …", "options.n_startup: …") is reported under that path.
_LEADING_PATH = re.compile(r"^([A-Za-z_][\w]*(?:\[\d+\])?(?:\.[\w+-]+(?:\[\d+\])?)*): (.+)$", re.S)


def nearest(name: str, choices: Sequence[str]) -> str | None:
    """The choice closest to a mistyped ``name`` (``trails`` -> ``trials``), if any is close."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def join_path(parts: Sequence[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _members(annotation: Any) -> list[Any]:
    """The non-None members of a union annotation ([] when it is not a union)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [_unwrap(a) for a in typing.get_args(annotation) if a is not type(None)]
    return []


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _step(annotation: Any, part: str | int) -> Any:
    """The annotation one location part below ``annotation`` (None when unknown)."""
    annotation = _unwrap(annotation)
    members = _members(annotation)
    if len(members) == 1:
        annotation = members[0]
    model = _model(annotation)
    if model is not None:
        field = model.model_fields.get(str(part))
        return field.annotation if field is not None else None
    args = [_unwrap(a) for a in typing.get_args(annotation)]
    origin = typing.get_origin(annotation)
    if origin in (list, set, frozenset) and args:
        return args[0]
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        return args[part] if isinstance(part, int) and part < len(args) else None
    if origin is dict and len(args) == 2:
        return args[1]
    return None


def _walk(loc: Sequence[str | int], root: type[BaseModel]) -> tuple[list[str | int], Any, Any]:
    """(path parts without union tags, the annotation holding the last part, the last one's)."""
    parts: list[str | int] = []
    parent: Any = None
    annotation: Any = root
    i = 0
    while i < len(loc):
        part = loc[i]
        if len(_members(_unwrap(annotation))) > 1 and isinstance(part, str):
            # a union member's tag, e.g. 'float' or 'function-after[_ordered(), Searched]'
            tagged = [m for m in _members(_unwrap(annotation))
                      if getattr(m, "__name__", str(m)) in part]
            annotation = tagged[0] if tagged else None
            i += 1
            continue
        parent = annotation
        annotation = _step(annotation, part) if annotation is not None else None
        parts.append(part)
        i += 1
    return parts, parent, annotation


def _field_names(annotation: Any) -> list[str]:
    model = _model(_unwrap(annotation))
    if model is None:
        members = [_model(m) for m in _members(_unwrap(annotation))]
        model = next((m for m in members if m is not None), None)
    return list(model.model_fields) if model is not None else []


def _message(err: dict[str, Any], parent: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        near = nearest(str(err["loc"][-1]), _field_names(parent))
        return "unknown key" + (f" (did you mean {near}?)" if near else
                                f"; known keys: {', '.join(_field_names(parent)) or 'none'}")
    if kind == "missing":
        return "required, but missing"
    message = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind in ("literal_error", "enum"):
        choices = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        near = nearest(str(err.get("input")), choices)
        message = f"{err.get('input')!r} is not one of {', '.join(choices)}"
        message += f" (did you mean {near}?)" if near else ""
    return message


def problems(exc: ValidationError, root: type[BaseModel],
             prefix: Sequence[str | int] = ()) -> list[tuple[str, str]]:
    """Every error in ``exc`` as ``(field path, message)``, union alternatives merged."""
    found: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for err in exc.errors():
        parts, parent, _ = _walk(err["loc"], root)
        inputs[join_path([*prefix, *parts])] = err.get("input")
        for message in _message(err, parent).split("\n"):  # a validator may report several
            where = parts
            leading = _LEADING_PATH.match(message)
            if leading and not message.startswith(("scorer ", "Input ")):
                where = [*parts, leading.group(1)]
                message = leading.group(2)
            path = join_path([*prefix, *where]) or "(top level)"
            if message not in found.setdefault(path, []):
                found[path].append(message)
    return [(path, _alternatives(messages, inputs.get(path))) for path, messages in found.items()]


def _alternatives(messages: list[str], given: Any) -> str:
    """One message for a value no member of a union accepts: 'got 'abc'; expected a number or
    a mapping' instead of each member's own complaint."""
    if len(messages) < 2 or not all(m.startswith("Input should be ") for m in messages):
        return " or ".join(messages)
    wanted = [re.sub(r" or instance of \w+$", "", m.removeprefix("Input should be ").split(",")[0])
              .replace("a valid dictionary", "a mapping").replace("a valid ", "a ") for m in messages]
    return f"got {given!r}; expected {' or '.join(dict.fromkeys(wanted))}"
