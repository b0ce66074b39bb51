"""`mergesearch architectures`: the architectures the registry knows, from their data files."""

from __future__ import annotations

import argparse

from merge_backend.architectures import ARCHITECTURES, SINGLE, SLIDERS, Architecture

COLUMNS = ("arch", "model", "ComfyUI node (sliders)", "vocabularies (blocks)", "text encoders",
           "other layouts read", "diffusers pipeline", "tiny family", "file")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("architectures", help="list the supported architectures (from their "
                       "data files; add your own with $MERGESEARCH_ARCHITECTURES)")
    p.add_argument("--markdown", action="store_true",
                   help="print the Markdown table the README carries")
    p.set_defaults(func=run_architectures)


def row(arch: Architecture) -> list[str]:
    """One architecture as the table shows it."""
    sliders = arch.vocabularies[SLIDERS]
    vocabularies = ", ".join(f"{v} {len(arch.block_names(v))}" for v in arch.vocabulary_names)
    encoders = ", ".join(f"{te.name} ({te.comfy_clip or te.converter})" for te in arch.text_encoders)
    tiny = "yes" if "tiny" in arch.configs and arch.tiny else "no"
    layouts = ", ".join(f"{lay.name} ({'+'.join(lay.components)})" for lay in arch.layouts)
    return [arch.name, arch.title, f"{sliders.node or '-'} ({len(sliders.names)})", vocabularies,
            encoders or "-", layouts or "-", arch.pipeline_class, tiny,
            arch.source.rpartition("/")[2]]


def markdown_table() -> str:
    """The README's table of architectures: one row per registered architecture file."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for arch in ARCHITECTURES.values():
        cells = row(arch)
        cells[0] = f"`{cells[0]}`"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_architectures(args: argparse.Namespace) -> int:
    if args.markdown:
        print(markdown_table(), end="")
        return 0
    rows = [list(COLUMNS[:-1]) + ["file"]] + [row(a)[:-1] + [a.source] for a in
                                               ARCHITECTURES.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    print(f"\n'{SINGLE}' (ModelMergeSimple) exists for every architecture. See "
          "merge_backend/architectures/README.md to add one.")
    return 0
