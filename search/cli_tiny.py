"""`mergesearch tiny DIR`: write the built-in tiny model family to try the tool without weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from merge_backend.output_files import check_new_output, removed_if_unfinished
from merge_backend.tiny import family_files, tiny_archs, write_tiny_family

from .cli_options import check_config_folder, check_seed


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny", help="write a tiny model family (real layout, random weights)")
    p.add_argument("folder", type=Path)
    p.add_argument("--arch", choices=tiny_archs(), default="sd1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace checkpoints of those names already in the folder")
    p.set_defaults(func=run_tiny)


def run_tiny(args: argparse.Namespace) -> int:
    check_seed("--seed", args.seed)
    outputs = list(family_files(args.folder, args.arch).values())
    for path in outputs:
        check_new_output(path, args.overwrite, ValueError)
    check_config_folder(args.folder, args.overwrite)
    with removed_if_unfinished(args.folder, [*outputs, args.folder / "config"]):
        family = write_tiny_family(args.folder, arch=args.arch, seed=args.seed,
                                   replace=args.overwrite)
    shown = {k: ({n: str(p) for n, p in v.items()} if isinstance(v, dict) else str(v))
             for k, v in vars(family).items()}
    print(json.dumps(shown, indent=2))
    return 0
