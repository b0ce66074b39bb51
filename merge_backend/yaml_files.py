"""The YAML (and JSON) files users write — study configs, architecture files, prompt and ratio
files — read with one-line errors: a file that cannot be read or parsed is refused naming the
file and the line and column where it breaks, never with a traceback or PyYAML's multi-line
report. A key given twice in one mapping is refused too (PyYAML keeps the last silently, so a
second ``trials:`` further down a config would win unseen).

Example:
    >>> read_yaml(Path("study.yaml"), ConfigError)               # doctest: +SKIP
    ConfigError: study.yaml: cannot read it (not valid YAML: line 3, column 1: expected ',' or
    '}', but got '<stream end>' (while parsing a flow mapping at line 2, column 9))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def unique_keys(loader: type) -> type:
    """``loader`` (a safe loader) refusing a key given twice in one mapping; a merge key's
    (``<<``) entries may still be overridden, as YAML means them to be."""
    class UniqueKeys(loader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: set = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        again = key in seen
                    except TypeError:  # an unhashable key: the base loader says so
                        continue
                    if again:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"found key {key!r} twice", key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep)
    return UniqueKeys


SAFE_LOADER = unique_keys(yaml.SafeLoader)


def read_yaml(path: str | Path, error: type[Exception], loader: type = SAFE_LOADER,
              name: str | None = None) -> Any:
    """``path``'s data (safe loading: plain data only); ``error(one line)`` when the file cannot
    be read, is not UTF-8, is not valid YAML or gives a key twice. ``name``: how the message names the file
    (a flag with it, say; default: its path)."""
    name = str(path) if name is None else name
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{name}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{name}: cannot read it (not UTF-8 text: byte {exc.start})") from None
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - loader is a safe loader
    except yaml.YAMLError as exc:
        raise error(f"{name}: cannot read it (not valid YAML: {yaml_problem(exc)})") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error as one line: where it broke, what broke, and what it was reading."""
    mark = getattr(exc, "problem_mark", None)
    if not isinstance(exc, yaml.MarkedYAMLError) or mark is None:
        return " ".join(str(exc).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if exc.context:
        where = exc.context_mark
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        text += f" ({exc.context}{at})"
    return " ".join(text.split())
