"""The `mergesearch` command: parse, call, print. Every sub-command lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# The module that defines each command (its ``add_parsers(sub)``). Only the module a command
# line names is imported: `mergesearch merge` does not load optuna and pandas, which cost a
# third of a second at start and as much again at exit. --help and unknown commands load all.
COMMANDS = {
    "run": "cli_study", "validate": "cli_study", "status": "cli_study", "best": "cli_study",
    "dashboard": "cli_study", "demo": "cli_study", "merge": "cli_merge", "export": "cli_export",
    "lora": "cli_lora", "tiny": "cli_tiny",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for every command, or only for ``command`` when it is a known one."""
    parser = argparse.ArgumentParser(
        prog="mergesearch",
        description="Find good Stable Diffusion block merges automatically.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in modules:
        importlib.import_module(f"{__package__}.{name}").add_parsers(sub)
    return parser


def quiet_libraries() -> None:
    """Keep the terminal for our own progress: no per-load bars or experimental notices."""
    import warnings

    warnings.filterwarnings("ignore", message=".*experimental feature.*")
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    logging.getLogger("optuna").setLevel(logging.WARNING)  # our progress line says it all
    logging.getLogger("root").setLevel(logging.ERROR)
    # diffusers itself is quieted where pipelines are loaded (merge_backend.pipeline): importing
    # it here would cost every command, `merge` included, a second and a half.


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("mergesearch: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        # Our errors are ValueError subclasses whose message names the file, key or field.
        print(f"mergesearch: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
