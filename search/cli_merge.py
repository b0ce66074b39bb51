"""`mergesearch merge …`: the ComfyUI merge nodes on the command line.

Each sub-command mirrors a node and builds a Recipe; merge_backend does the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from merge_backend import ARCHITECTURES, ClipMerge, Recipe, Source, merge_to_file, open_checkpoint
from merge_backend.architectures import SLIDERS, block_names, text_encoder_block, vocabulary_of
from merge_backend.dtypes import DTYPES
from merge_backend.recipe import RecipeError, check_finite
from merge_backend.source_files import check_source

from .cli_options import output_path

NODES = {
    "simple": ("ModelMergeSimple: ratio*model1 + (1-ratio)*model2", "weighted_sum"),
    "blocks": ("ModelMergeBlocks: input / middle / out ratios", "weighted_sum"),
    "layers": ("the model-specific node (ModelMergeSD1 / SDXL / SD3_2B / SD35_Large / Flux1 …): "
               "a ratio per layer (comfy slider names, or another vocabulary's)",
               "weighted_sum"),
    "subtract": ("ModelMergeSubtract: multiplier*(model1 - model2)", "subtract"),
    "add": ("ModelMergeAdd: model1 + model2", "add"),
    "add-difference": ("model1 + (1-ratio)*multiplier*(model2 - base)", "add_difference"),
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    merge = sub.add_parser("merge", help="merge checkpoints like ComfyUI's model-merge nodes")
    nodes = merge.add_subparsers(dest="node", required=True, metavar="NODE")
    for name, (help_text, _) in NODES.items():
        p = nodes.add_parser(name, help=help_text, description=help_text)
        p.add_argument("model1", type=Path)
        p.add_argument("model2", type=Path)
        if name == "add-difference":
            p.add_argument("base", type=Path, help="the model model2 was trained from")
        p.add_argument("-o", "--output", type=output_path, required=True, help="the .safetensors to write")
        _node_options(p, name)
        _common_options(p)
        p.set_defaults(func=run_merge)


def _node_options(p: argparse.ArgumentParser, name: str) -> None:
    if name == "simple":
        p.add_argument("--ratio", type=float, default=1.0, help="model1's share (default 1.0)")
    elif name == "blocks":
        for block in ("input", "middle", "out"):
            p.add_argument(f"--{block}", type=float, default=1.0, help=f"{block} ratio")
    elif name == "layers":
        p.add_argument("--vocabulary",
                       help="the block names: comfy (the architecture's ComfyUI node), mbw, or "
                            "any vocabulary its file defines (see `mergesearch architectures`); "
                            "default: the one the names given belong to, comfy first")
        p.add_argument("--ratio", action="append", default=[], metavar="NAME=VALUE",
                       help="a block's ratio, e.g. input_blocks.4.=0.3 or IN04=0.3; repeatable; "
                            "blocks not given keep ComfyUI's default 1.0")
        p.add_argument("--ratios-file", type=Path, help="YAML/JSON mapping of block name to ratio")
        p.add_argument("--default", type=float, default=1.0,
                       help="ratio of the UNet blocks not given (the text encoders keep model1's "
                            "unless their block, mbw's BASE, is given)")
    elif name in ("subtract", "add-difference"):
        p.add_argument("--multiplier", type=float, default=1.0)
    if name == "add-difference":
        p.add_argument("--ratio", type=float, default=0.0,
                       help="model1's share per block (0 = the whole difference; default 0)")


def _common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--clip", choices=("model1", "simple", "subtract", "add"), default="model1",
                   help="text encoders: keep model1's (ComfyUI's model merges do) or merge them "
                        "like CLIPMergeSimple / Subtract / Add")
    p.add_argument("--clip-ratio", type=float, default=1.0)
    p.add_argument("--clip-multiplier", type=float, default=1.0)
    p.add_argument("--arithmetic", choices=("comfy", "fast"), default="comfy",
                   help="comfy: bit-exact with ComfyUI (default); fast: the study engine's lerp, "
                        "in --unet-dtype (fp16: the quickest, one lerp straight into fp16)")
    add_precision_options(p)
    p.add_argument("--allow-extrapolation", action="store_true",
                   help="accept ratios outside [0, 1]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true")


def add_precision_options(p: argparse.ArgumentParser) -> None:
    """--unet-dtype / --text-encoder-dtype: the precision ComfyUI would hold each part in."""
    p.add_argument("--unet-dtype", choices=tuple(DTYPES), default="fp32",
                   help="hold the UNet in this precision while merging, as ComfyUI does: "
                        "fp32 (default; ComfyUI on the CPU, --fp32-unet) or fp16 / bf16 (ComfyUI "
                        "on most GPUs, --fp16-unet / --bf16-unet)")
    p.add_argument("--text-encoder-dtype", choices=tuple(DTYPES), default="fp32",
                   help="hold the text encoders in this precision while merging: fp32 (default; "
                        "ComfyUI with --fp32-text-enc) or fp16 (ComfyUI's default) / bf16")


def parse_ratio_pairs(pairs: list[str]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.rpartition("=")
        if not sep or not name:
            raise RecipeError(f"--ratio {pair!r}: write NAME=VALUE, e.g. input_blocks.4.=0.3")
        try:
            out[name] = float(value)
        except ValueError:
            raise RecipeError(f"--ratio {pair!r}: {value!r} is not a number") from None
        check_finite(f"--ratio {name}", out[name])
    return out


def load_ratio_file(path: Path) -> dict[str, float]:
    from .config import read_yaml_mapping

    check_source(path, error=RecipeError)  # a FIFO would block the read forever
    data = read_yaml_mapping(path, f"--ratios-file {path}", RecipeError)
    ratios = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            shown = "null" if value is None else f"{value!r}"
            raise RecipeError(f"--ratios-file {path}: {key}: {shown} is not a number; give each "
                              "block one ratio (e.g. IN04: 0.3)")
        check_finite(f"--ratios-file {path}: {key}", float(value))
        ratios[str(key)] = float(value)
    return ratios


_NUMBER_FLAGS = ("ratio", "input", "middle", "out", "default", "multiplier", "clip_ratio",
                 "clip_multiplier")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The Recipe a `mergesearch merge NODE …` command line describes."""
    for name in _NUMBER_FLAGS:  # argparse's float() takes "nan" and "inf"
        value = getattr(args, name, None)
        if isinstance(value, float):
            check_finite(f"--{name.replace('_', '-')}", value)
    arch = open_checkpoint(args.model1).arch.name
    method = NODES[args.node][1]
    models = {"model1": Source(str(args.model1)), "model2": Source(str(args.model2))}
    if args.node == "add-difference":
        models["base"] = Source(str(args.base))
    vocabulary, ratios = _ratios(args, arch)
    clip = None
    if args.clip != "model1":
        clip = ClipMerge({"simple": "weighted_sum"}.get(args.clip, args.clip),
                         args.clip_ratio, args.clip_multiplier)
    recipe = Recipe(arch=arch, method=method, models=models, vocabulary=vocabulary,
                    ratios=ratios, multiplier=getattr(args, "multiplier", 1.0), clip=clip,
                    arithmetic=args.arithmetic, allow_extrapolation=args.allow_extrapolation,
                    unet_dtype=args.unet_dtype, text_encoder_dtype=args.text_encoder_dtype)
    recipe.validate()
    return recipe


def _ratios(args: argparse.Namespace, arch: str) -> tuple[str, dict[str, float]]:
    if args.node in ("simple", "add-difference"):
        return "single", {"all": args.ratio}
    if args.node == "blocks":
        return "blocks", {"input": args.input, "middle": args.middle, "out": args.out}
    if args.node != "layers":
        return "single", {}
    given = load_ratio_file(args.ratios_file) if args.ratios_file else {}
    given.update(parse_ratio_pairs(args.ratio))
    known = ARCHITECTURES[arch].vocabulary_names
    vocabulary = args.vocabulary or vocabulary_of(ARCHITECTURES[arch], given, SLIDERS) or SLIDERS
    if vocabulary not in known:
        raise RecipeError(f"--vocabulary {vocabulary!r}: {arch} has {', '.join(known)}")
    names = block_names(ARCHITECTURES[arch], vocabulary)
    unknown = [n for n in given if n not in names]
    if unknown:
        raise RecipeError(f"unknown block name(s) {', '.join(map(repr, unknown))} for the "
                          f"{vocabulary} vocabulary of {arch}; valid names: {', '.join(names)}")
    # --default is for the UNet's blocks: the text encoders keep model1's unless BASE is given
    te_block = text_encoder_block(ARCHITECTURES[arch], vocabulary)
    return vocabulary, {n: given.get(n, 1.0 if n == te_block else args.default) for n in names}


def run_merge(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)

    def progress(done: int, total: int, key: str) -> None:
        if not args.quiet:
            print(f"\r  merging {done}/{total} tensors", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    result = merge_to_file(recipe, args.output, dtype=args.dtype, overwrite=args.overwrite,
                           progress=progress)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps({"output": str(result.output), "tensors": result.tensors,
                      "merged": result.merged, "seconds": round(result.seconds, 2)}))
    return 0
