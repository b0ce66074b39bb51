"""The `mergesearch` command: parse, call, print. Every sub-command lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys

from .cli_export import add_export_parser
from .cli_lora import add_lora_parser
from .cli_merge import add_merge_parser
from .cli_study import add_study_parsers
from .cli_tiny import add_tiny_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergesearch",
        description="Find good Stable Diffusion block merges automatically.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_study_parsers(sub)
    add_merge_parser(sub)
    add_export_parser(sub)
    add_lora_parser(sub)
    add_tiny_parser(sub)
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
    args = build_parser().parse_args(argv)
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
