"""`mergesearch compare RUN --trials 12,57,90`: chosen trials side by side on one HTML page."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_options import add_drawing_options, output_path, source_folders


def _numbers(text: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: trial numbers separated by commas, e.g. "
                                         "12,57,90") from None
    if not numbers:
        raise argparse.ArgumentTypeError("name at least one trial, e.g. --trials 12")
    return list(dict.fromkeys(numbers))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="chosen trials' probe grids side by side with the parents and the "
                        "uniform merge, on one self-contained HTML page",
        description="Writes one HTML page (images inlined, no scripts): each chosen trial's "
                    "labelled probe grid, scores and ratio chart beside model1's, model2's and "
                    "the uniform merge's probe grids (drawn for the page).")
    p.add_argument("run", type=Path, help="a run folder (output/NAME)")
    p.add_argument("--trials", type=_numbers, required=True, metavar="N,N,...",
                   help="trial numbers, comma-separated (e.g. 12,57,90)")
    p.add_argument("-o", "--output", type=output_path,
                   help="the page to write (default: RUN/exports/compare-12-57-90.html)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing page")
    add_drawing_options(p, "a probe-set YAML (or a study config: its probes) to draw the "
                           "references with", "the parents", "the references are drawn")
    p.set_defaults(func=compare_cmd)


def compare_cmd(args: argparse.Namespace) -> int:
    from merge_backend.atomic_files import atomic_write_text
    from merge_backend.output_files import check_new_output

    from .cli_export import pick_device
    from .compare import compare
    from .run_folder import RunError, RunFolder

    folders = source_folders(args)
    run = RunFolder.load(args.run)
    output = args.output or run.exports / f"compare-{'-'.join(map(str, args.trials))}.html"
    if output.suffix.lower() not in (".html", ".htm"):
        raise RunError(f"-o {output}: the page is HTML; give a file name ending in .html")
    check_new_output(output, args.overwrite, RunError)
    probe_set = None
    if args.probes is not None:
        from evaluators import ProbeSet

        probe_set = ProbeSet.from_yaml(args.probes)
    page = compare(run, args.trials, device=pick_device(args), config_folder=args.config_folder,
                   probe_set=probe_set, sources=folders)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, page, args.overwrite)
    print(json.dumps({"written": [str(output)]}, indent=2))
    return 0
