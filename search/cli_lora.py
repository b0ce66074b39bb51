"""`mergesearch lora apply|add|extract …`: LoRAs on the command line; merge_backend.lora does the work."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from merge_backend.architectures import block_names, vocabulary_of
from merge_backend.checkpoint import open_checkpoint
from merge_backend.devices import usable_device
from merge_backend.lora import LoraError, add_loras, extract_lora, read_lora, save_lora
from merge_backend.lora.extract import LORA_TYPES
from merge_backend.lora.formats import check_lora_output
from merge_backend.lora.svd import (
    CLAMP_QUANTILE,
    DEFAULT_CLAMP,
    DEFAULT_FACTOR_DTYPE,
    SVD_METHODS,
)
from merge_backend.merge_file import DTYPES, apply_to_file
from merge_backend.recipe import LoraSpec, RecipeError, check_finite
from merge_backend.source_files import resolved

from .cli_merge import add_precision_options
from .cli_options import output_path


def _partial(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partial", action="store_true",
                   help="apply the modules mergesearch can read and skip (and list) keys of "
                        "formats it cannot (bundled embeddings, PEFT OFT, ...)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    lora = sub.add_parser("lora", help="apply, add and extract LoRAs")
    cmds = lora.add_subparsers(dest="lora_command", required=True, metavar="COMMAND")

    p = cmds.add_parser("apply", help="write a checkpoint with LoRAs added to its weights")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]")
    p.add_argument("-o", "--output", type=output_path, required=True)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    p.add_argument("--block-strength", action="append", default=[], metavar="NAME=VALUE",
                   help="a UNet block's strength factor (mbw names like IN04, or ComfyUI names "
                        "like input_blocks.4.); repeatable; other blocks keep 1.0")
    p.add_argument("--te-strength", type=float, help="text-encoder strength (default: STRENGTH)")
    p.add_argument("--device", default="cpu", help="where the deltas are computed")
    _partial(p)
    add_precision_options(p)
    _common(p)
    p.set_defaults(func=run_apply)

    p = cmds.add_parser("add", help="add LoRAs into one (exact, or resized with --rank)")
    p.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]")
    p.add_argument("-o", "--output", type=output_path, required=True)
    p.add_argument("--rank", type=int, help="resize to this rank by SVD (default: exact, ranks add)")
    add_clamp_options(p)
    _lora_output(p)
    p.set_defaults(func=run_add)

    p = cmds.add_parser("extract", help="extract model1 - model2 as a LoRA (ComfyUI LoraSave)")
    p.add_argument("model1", type=Path)
    p.add_argument("model2", type=Path)
    p.add_argument("-o", "--output", type=output_path, required=True)
    p.add_argument("--rank", type=int, required=True, help="8-32 for a style, 64+ for a whole model")
    p.add_argument("--text-encoder", action="store_true", help="also extract the text encoder(s)")
    p.add_argument("--type", choices=LORA_TYPES, default="standard", dest="lora_type",
                   help="standard: low-rank factors; full_diff: whole differences (.diff keys, "
                        "which ComfyUI reads and diffusers does not)")
    add_clamp_options(p)
    p.add_argument("--bias-diff", action=argparse.BooleanOptionalAction, default=None,
                   help="also store norm (.diff) and bias (.diff_b) differences, as ComfyUI's "
                        "LoraSave does (default: on with --format comfyui, off for kohya files, "
                        "since diffusers cannot read .diff keys; ComfyUI reads both)")
    _lora_output(p)
    p.set_defaults(func=run_extract)


def add_clamp_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--clamp QUANTILE`` / ``--no-clamp``, the same on ``lora extract``, ``lora add --rank``
    and ``export --to lora``; the default is ``svd.DEFAULT_CLAMP``."""
    default = "no clamp" if DEFAULT_CLAMP is None else f"--clamp {DEFAULT_CLAMP}"
    group = p.add_mutually_exclusive_group()
    group.add_argument("--clamp", type=float, default=DEFAULT_CLAMP, metavar="QUANTILE",
                       help=f"{prefix}clip the LoRA factors at this quantile of their magnitudes "
                            f"(ComfyUI and kohya clip at {CLAMP_QUANTILE}); default: {default}")
    group.add_argument("--no-clamp", dest="clamp", action="store_const", const=None,
                       help=f"{prefix}keep the factors unclipped (default: {default})")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true")


def _lora_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("kohya", "comfyui"), default="kohya", dest="fmt")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=DEFAULT_FACTOR_DTYPE)
    p.add_argument("--svd", choices=SVD_METHODS, default="auto",
                   help="auto (default): the exact SVD's error, randomized where that is as "
                        "accurate and faster; exact; lowrank: fastest, up to ~0.5%% worse per layer")
    p.add_argument("--device", default="cpu", help="where SVDs run (cpu, cuda, cuda:1, ...)")
    _common(p)


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """'style.safetensors:0.8' -> (path, 0.8); no ':number' suffix -> strength 1.0."""
    path, sep, value = arg.rpartition(":")
    if sep and path:
        try:
            strength = float(value)
        except ValueError:
            if Path(path).is_file() and not Path(arg).exists():  # a typo in the strength
                raise LoraError(f"LORA:STRENGTH {arg!r}: the strength {value!r} is not a "
                                "number") from None
            return Path(arg), 1.0
        _finite(f"LORA:STRENGTH {arg!r}: the strength", strength)
        return Path(path), strength
    return Path(arg), 1.0


def _finite(where: str, value: float) -> None:
    try:
        check_finite(where, value)
    except RecipeError as exc:
        raise LoraError(str(exc)) from None


def parse_block_strengths(pairs: list[str], arch) -> tuple[str, dict[str, float]]:
    """The vocabulary the names belong to, and the strengths."""
    values = {}
    for pair in pairs:
        name, sep, value = pair.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError(pair)
            values[name] = float(value)
        except ValueError:
            raise LoraError(f"--block-strength {pair!r}: write NAME=VALUE, e.g. IN04=0.5") from None
        _finite(f"--block-strength {name}", values[name])
    # the report vocabulary (mbw for SD) first, then the others the architecture file lists
    vocabulary = vocabulary_of(arch, values, arch.report_vocabulary)
    if vocabulary is not None:
        return vocabulary, values
    names = ", ".join(block_names(arch, arch.report_vocabulary))
    raise LoraError(f"--block-strength: {', '.join(values)} are not all block names of one "
                    f"vocabulary; {arch.report_vocabulary} names: {names}")


def _progress(args: argparse.Namespace, what: str):
    def show(done: int, total: int, key: str) -> None:
        if not args.quiet:
            print(f"\r  {what} {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)
    return show


def run_apply(args: argparse.Namespace) -> int:
    device = usable_device(args.device, "--device")  # before any work
    if args.te_strength is not None:
        _finite("--te-strength", args.te_strength)
    arch = open_checkpoint(args.checkpoint).arch
    vocabulary, blocks = parse_block_strengths(args.block_strength, arch)
    specs = [LoraSpec(str(path), strength, blocks or None, args.te_strength, partial=args.partial)
             for path, strength in map(parse_lora_arg, args.loras)]
    result = apply_to_file(args.checkpoint, specs, args.output, vocabulary=vocabulary,
                           dtype=args.dtype, overwrite=args.overwrite, device=device,
                           progress=_progress(args, "writing"), unet_dtype=args.unet_dtype,
                           text_encoder_dtype=args.text_encoder_dtype)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps({"output": str(result.output), "tensors": result.tensors,
                      "changed": result.lora_changed, "seconds": round(result.seconds, 2)}))
    return 0


def run_add(args: argparse.Namespace) -> int:
    device = usable_device(args.device, "--device")  # before any work
    if args.rank is not None and args.rank < 1:
        raise LoraError(f"--rank must be at least 1, got {args.rank}")
    if args.rank is None and args.clamp != DEFAULT_CLAMP:
        raise LoraError(f"--clamp {args.clamp}: only a resize (--rank) makes factors to clip; "
                        "an exact add keeps the LoRAs' own")
    parsed = list(map(parse_lora_arg, args.loras))
    target = resolved(args.output, LoraError)
    for path, _ in parsed:  # the output replaces its file: never one of the inputs
        if resolved(path, LoraError) == target or (
                target.exists() and path.exists() and target.samefile(path)):
            raise LoraError(f"output {args.output} is one of the LoRAs added; choose another "
                            "path (sources are never modified)")
    check_lora_output(Path(args.output), args.overwrite)  # before the SVDs of a --rank
    loras = [(read_lora(path), strength) for path, strength in parsed]
    for lora, _ in loras:
        for note in lora.notes():
            print(f"note: {note}", file=sys.stderr)
    merged, table = add_loras(loras, rank=args.rank, svd=args.svd, clamp=args.clamp,
                              device=device)
    sources = {str(p): s for p, s in map(parse_lora_arg, args.loras)}
    save_lora(merged, args.output, fmt=args.fmt, dtype=DTYPES[args.dtype], overwrite=args.overwrite,
              metadata={"mergesearch.add": json.dumps({"loras": sources, "rank": args.rank})})
    if table is not None and not args.quiet:
        print(table.format(), file=sys.stderr)
    ranks = [m.rank for m in merged.modules.values() if m.rank]
    print(json.dumps({"output": str(args.output), "modules": len(merged.modules),
                      "max_rank": max(ranks, default=0),
                      "overall_error": None if table is None else table.overall}))
    return 0


def run_extract(args: argparse.Namespace) -> int:
    device = usable_device(args.device, "--device")  # before any work
    result = extract_lora(args.model1, args.model2, args.output, rank=args.rank,
                          text_encoder=args.text_encoder, fmt=args.fmt, lora_type=args.lora_type,
                          clamp=args.clamp, bias_diff=args.bias_diff, svd=args.svd,
                          device=device, dtype=args.dtype, overwrite=args.overwrite,
                          progress=_progress(args, "layers"))
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if not args.quiet:  # as `lora add`'s: stdout holds the JSON summary alone
        print(result.report(), file=sys.stderr)
    print(json.dumps({"output": str(result.output), "rank": result.rank,
                      "max_rank": result.max_rank,
                      "modules": result.modules, "skipped_unchanged": result.skipped,
                      "overall_error": result.table.overall,
                      "svd": result.svd_methods, "seconds": round(result.seconds, 2)}))
    return 0
