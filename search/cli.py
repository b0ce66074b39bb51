"""The `mergesearch` command: parse, call, print. Every sub-command lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys

from .cli_merge import add_merge_parser
from .cli_tiny import add_tiny_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergesearch",
        description="Find good Stable Diffusion block merges automatically.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_merge_parser(sub)
    add_tiny_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
