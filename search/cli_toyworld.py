"""`mergesearch toyworld DIR` writes the shipped toy world; `mergesearch toyworld build DIR`
trains it again from its seed (about half an hour on a 2-core CPU) and prints its figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_options import check_config_folder, check_seed


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "toyworld", help="write the trained toy world (tiny SD1 family + CLIP scorers); "
                         "`toyworld build DIR` trains it from its seed",
        description="`mergesearch toyworld DIR` writes the shipped world into DIR. "
                    "`mergesearch toyworld build DIR` re-trains every model from the seed on "
                    "this machine's CPU, writes the world into DIR and prints its acceptance "
                    "figures. (A folder named 'build': write ./build.)")
    p.add_argument("words", nargs="+", metavar="[build] DIR")
    p.add_argument("--seed", type=int, help="build: the world's seed (default 0)")
    p.add_argument("--plan", metavar="NAME",
                   help="build: which plan (toyworld.stages.PLANS: shipped, the world in "
                        "toyworld/weights; first, the world shipped before it; or one of the "
                        "layout16 experiments; an unknown name lists them; default shipped)")
    p.add_argument("--no-figures", action="store_true",
                   help="build: skip the acceptance figures after training")
    p.add_argument("--keep-work", action="store_true",
                   help="build: keep the stages' intermediate files in DIR/work")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a world's files (and, for build, DIR/work) already in DIR")
    p.set_defaults(func=run_toyworld)


def run_toyworld(args: argparse.Namespace) -> int:
    from merge_backend.output_files import check_new_output, removed_if_unfinished
    from toyworld.files import world_files, write_world

    words = list(args.words)
    if words[0] == "build" and len(words) != 2:
        raise ValueError("usage: mergesearch toyworld build DIR")
    if words[0] != "build" and len(words) != 1:
        raise ValueError("usage: mergesearch toyworld DIR  (or: mergesearch toyworld build DIR)")
    folder = Path(words[-1])
    if words[0] == "build":
        from toyworld.stages import PLANS

        args.seed = 0 if args.seed is None else args.seed
        args.plan = args.plan or "shipped"
        check_seed("--seed", args.seed)
        if args.plan not in PLANS:
            raise ValueError(f"--plan: unknown plan {args.plan!r}; known: {', '.join(PLANS)}")
    else:
        given = [flag for flag, value in (("--seed", args.seed is not None),
                                          ("--plan", args.plan is not None),
                                          ("--no-figures", args.no_figures),
                                          ("--keep-work", args.keep_work)) if value]
        if given:
            raise ValueError(f"{given[0]} is an option of `mergesearch toyworld build DIR`; "
                             "`mergesearch toyworld DIR` writes the shipped world as it is")
    outputs = world_files(folder)
    for path in outputs:  # before half an hour of training, too
        check_new_output(path, args.overwrite, ValueError)
    check_config_folder(folder, args.overwrite)
    outputs.append(folder / "config")
    if words[0] == "build":
        if (folder / "work").exists() and not args.overwrite:
            raise ValueError(f"{folder / 'work'} exists, and a build starts it afresh; pass "
                             "--overwrite to replace it, or choose another folder")
        if not args.keep_work:
            outputs.append(folder / "work")
        return build(folder, args, outputs)
    with removed_if_unfinished(folder, outputs):
        world = write_world(folder, replace=args.overwrite)
    print(json.dumps({"base": str(world.base), "style_a": str(world.style_a),
                      "style_b": str(world.style_b), "config_folder": str(world.config_folder),
                      "clip_config": str(world.clip_config),
                      "clip_weights": str(world.clip_weights),
                      "house_head": str(world.house_head),
                      "study_config": str(world.study_config)}, indent=2))
    print(f"try: mergesearch run {world.study_config}", file=sys.stderr)
    return 0


def build(folder: Path, args: argparse.Namespace, outputs: list[Path]) -> int:
    """Train the world; a build that fails or is interrupted takes back ``outputs`` (its
    figures come after: stopping them keeps the world)."""
    from dataclasses import replace

    from merge_backend.output_files import removed_if_unfinished
    from toyworld.build import build_world
    from toyworld.stages import PLANS

    with removed_if_unfinished(folder, outputs):
        world = build_world(folder, replace(PLANS[args.plan], seed=args.seed),
                            keep_work=args.keep_work)
    print(f"world written to {world.folder}", file=sys.stderr)
    from .toyworld_figures import TARGETS, Figure, measure_figures

    minutes = json.loads(world.manifest.read_text())["build_seconds"] / 60
    print(f"rebuild from the seed: {Figure(minutes, TARGETS['build_minutes'], False)} minutes "
          f"(stage times in {world.manifest})")
    if not args.no_figures:
        measure_figures(world, demo=False)
    return 0
