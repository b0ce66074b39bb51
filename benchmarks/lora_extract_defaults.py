"""Benchmark (issue 18): the clamp and output dtype ``lora extract`` should default to.

``lora extract`` (``merge_backend.lora.extract_lora``, the code users run) on three kinds of
difference, each at ranks 4/8/16/32, with the factors clipped at the 0.99 quantile (ComfyUI's
and kohya's clamp) or not, written fp16 or fp32:

- ``baked@S``: the tiny SD1 base plus a rank-8 LoRA built here (every other LoRA-able UNet
  module; each delta's RMS S times its weight's, S in ``--shares``), baked in by
  ``apply_to_file`` in fp32 (``lora apply --dtype fp32``): pulling a LoRA back out of a
  fine-tune, what users extract for most. Besides the error against the difference, the
  *recovery* error against the LoRA's own deltas is measured;
- ``baked_random``: the same with ``random_lora(rank=8, every=2)`` (every delta's RMS 0.05
  whatever its weight's: the project's synthetic LoRA, larger than the weights here);
- ``baked_fp16@S``: the same (S = ``--share``) with base and fine-tune stored fp16, as users'
  files are: the fine-tune's rounding is a full-rank difference no rank recovers (the floor
  any extraction meets on such files), shown for scale;
- ``finetune``: the toy world's ``style_a`` minus its ``base`` (toyworld/weights: trained
  weights, fp16, a full fine-tune's difference);
- ``noise@S``: the tiny SD1 base plus i.i.d. Gaussian noise (S = ``--share`` times each
  weight's RMS) on every other LoRA-able UNet module: the flattest spectrum.

Errors are relative Frobenius errors ||Δ - LoRA|| / ||Δ|| over the extracted modules, of what
the file holds (fp16 rounding and clamp included; ``ExtractResult.table``), overall and per
block. The per-block tables are printed at rank 8. Every run is reported.

    .venv/bin/python benchmarks/lora_extract_defaults.py [--ranks 4 8 16 32]
        [--shares 0.01 0.05 0.25] [--share 0.05] [--threads 1]
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _fullsize import goal, machine  # noqa: E402

from merge_backend.checkpoint import open_checkpoint  # noqa: E402
from merge_backend.lora import (  # noqa: E402
    LoraFile,
    LoraModule,
    LoraUse,
    extract_lora,
    lora_deltas_for_key,
    name_table,
    random_lora,
    read_lora,
    save_lora,
)
from merge_backend.lora.svd import CLAMP_QUANTILE, DEFAULT_CLAMP, shaped  # noqa: E402
from merge_backend.merge_file import apply_to_file  # noqa: E402
from merge_backend.recipe import LoraSpec  # noqa: E402
from merge_backend.tiny import write_tiny_family  # noqa: E402

BAKED_RANK = 8
DTYPES = ("fp16", "fp32")
DEFAULT_DTYPE = inspect.signature(extract_lora).parameters["dtype"].default
TOYWORLD = ROOT / "toyworld" / "weights"


def unet_targets(path: Path):
    """(target, original shape) of every other LoRA-able UNet module of a tiny SD1 file."""
    ckpt = open_checkpoint(path)
    table = name_table("sd1")
    found = [t for t in table.components(["unet"]) if t.lora_able and t.key in ckpt
             and table.can_name(t, "kohya")]
    return ckpt, table, [(t, tuple(ckpt.shape(t.key))) for t in found[::2]]


def baked_lora(base: Path, out: Path, share: float) -> dict[str, torch.Tensor]:
    """Write a rank-8 kohya LoRA (no alpha: scale 1) to ``out``; original key -> its delta."""
    ckpt, table, targets = unet_targets(base)
    gen = torch.Generator().manual_seed(18)
    modules, deltas = {}, {}
    for target, shape in targets:
        weight = ckpt.get(target.key).float()
        rows, inner = shape[0], math.prod(shape[1:])
        r = min(BAKED_RANK, rows, inner)
        up, down = torch.randn(rows, r, generator=gen), torch.randn(r, inner, generator=gen)
        delta = up @ down
        scale = math.sqrt(share * weight.pow(2).mean().sqrt().item() / delta.pow(2).mean().sqrt())
        up, down = up * scale, down * scale
        deltas[target.key] = (up @ down).reshape(shape)
        modules[target.slot] = LoraModule(target, *shaped(up, down, shape), None,
                                          name=table.name(target, "kohya"))
    save_lora(LoraFile(ckpt.arch, modules, None, "kohya", {}), out, dtype=torch.float32)
    return deltas


def noisy(base: Path, out: Path, share: float) -> None:
    ckpt, _, targets = unet_targets(base)
    state = load_file(str(base))
    gen = torch.Generator().manual_seed(19)
    for target, shape in targets:
        w = state[target.key]
        state[target.key] = w + share * w.pow(2).mean().sqrt() * torch.randn(shape, generator=gen)
    save_file(state, str(out))


def recovery(lora_path: Path, deltas: dict[str, torch.Tensor], base: Path) -> float:
    """||extracted - baked LoRA|| / ||baked LoRA|| over every key either changes."""
    use, ckpt = LoraUse(read_lora(lora_path)), open_checkpoint(base)
    err = norm = 0.0
    for key in set(use.keys()) | set(deltas):
        want = deltas.get(key, torch.zeros(ckpt.shape(key)))
        got = lora_deltas_for_key([use], key, want.shape) if key in use.keys() else 0.0
        err += (want - got).double().pow(2).sum().item()
        norm += want.double().pow(2).sum().item()
    return math.sqrt(err / norm)


def zero_modules(path: Path) -> int:
    """Modules whose up factor is zero everywhere (what skipping unchanged modules removes)."""
    return sum(1 for k, v in load_file(str(path)).items()
               if k.endswith("lora_up.weight") and not torch.any(v))


def setting_name(clamp: float | None, dtype: str) -> str:
    return f"{'clamp' + str(clamp) if clamp is not None else 'noclamp'}/{dtype}"


def run_case(name: str, model1: Path, model2: Path, ranks, work: Path,
             deltas: dict[str, torch.Tensor] | None) -> dict:
    rows: dict = {}
    for rank in ranks:
        for clamp in (CLAMP_QUANTILE, None):
            for dtype in DTYPES:
                out = work / f"{name}-{rank}-{clamp}-{dtype}.safetensors"
                start = time.perf_counter()
                result = extract_lora(model1, model2, out, rank=rank, clamp=clamp, dtype=dtype,
                                      overwrite=True)
                seconds = time.perf_counter() - start
                row = {"error": result.table.overall, "blocks": result.table.rows(),
                       "written": result.modules, "skipped": result.skipped,
                       "zero": zero_modules(out), "seconds": seconds,
                       "recovery": None if deltas is None else recovery(out, deltas, model2)}
                rows[(rank, clamp, dtype)] = row
                rec = "" if deltas is None else f"  recovery {row['recovery']:.3e}"
                print(f"{name:<15} rank {rank:2d} {setting_name(clamp, dtype):<14} error "
                      f"{row['error']:.3e}{rec}  modules {row['written']} (skipped "
                      f"{row['skipped']}, zero factors {row['zero']})  {seconds:.1f} s",
                      flush=True)
    return rows


def print_blocks(name: str, rows: dict, rank: int) -> None:
    settings = [(c, d) for c in (CLAMP_QUANTILE, None) for d in DTYPES]
    print(f"\n{name}: per-block relative error at rank {rank}")
    print(f"{'block':<8} {'|diff|':>9} " + " ".join(f"{setting_name(*s):>15}" for s in settings))
    blocks = {b: n for b, _, _, n in rows[(rank, *settings[0])]["blocks"]}
    for block, norm in blocks.items():
        errors = [{b: e for b, _, e, _ in rows[(rank, *s)]["blocks"]}[block] for s in settings]
        print(f"{block:<8} {norm:>9.3g} " + " ".join(f"{e:>15.3e}" for e in errors))
    print(f"{'overall':<8} {'':>9} "
          + " ".join(f"{rows[(rank, *s)]['error']:>15.3e}" for s in settings))


def build_cases(work: Path, shares: list[float], share: float) -> dict:
    """name -> (model1, model2, the baked LoRA's deltas or None)."""
    fam = write_tiny_family(work / "tiny", "sd1")
    base16 = work / "base-fp16.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v
               for k, v in load_file(str(fam.base)).items()}, str(base16))
    cases = {}
    for s in shares:
        lora = work / f"baked-lora-{s}.safetensors"
        deltas = baked_lora(fam.base, lora, s)
        spec = [LoraSpec(str(lora), 1.0)]
        apply_to_file(fam.base, spec, work / f"baked-{s}.safetensors", dtype="fp32")
        cases[f"baked@{s}"] = (work / f"baked-{s}.safetensors", fam.base, deltas)
        if s == share:
            apply_to_file(base16, spec, work / "baked-fp16.safetensors", dtype="fp16")
            fp16 = (work / "baked-fp16.safetensors", base16, deltas)
    cases[f"baked_fp16@{share}"] = fp16
    lora = random_lora(open_checkpoint(fam.base), rank=BAKED_RANK, seed=1, every=2)
    save_lora(lora, work / "random-lora.safetensors", dtype=torch.float32)
    apply_to_file(fam.base, [LoraSpec(str(work / "random-lora.safetensors"), 1.0)],
                  work / "baked-random.safetensors", dtype="fp32")
    base = open_checkpoint(fam.base)  # no alpha stored: scale 1; UNet weights: no transposes
    deltas = {m.target.key: (m.up.flatten(1) @ m.down.flatten(1)).reshape(base.shape(m.target.key))
              for m in lora.modules.values()}
    cases["baked_random"] = (work / "baked-random.safetensors", fam.base, deltas)
    cases["finetune"] = (TOYWORLD / "style_a.safetensors", TOYWORLD / "base.safetensors", None)
    noisy(fam.base, work / "noise.safetensors", share)
    cases[f"noise@{share}"] = (work / "noise.safetensors", fam.base, None)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.01, 0.05, 0.25],
                        help="the baked LoRAs' RMS relative to each weight's (the clamp's harm "
                             "depends on the difference's scale)")
    parser.add_argument("--share", type=float, default=0.05,
                        help="the noise's and the fp16-stored baked LoRA's (one of --shares)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: small SVDs on a shared 2-core machine)")
    args = parser.parse_args()
    if args.share not in args.shares:
        parser.error(f"--share {args.share} must be one of --shares")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print(f"default clamp: {DEFAULT_CLAMP}; default dtype: {DEFAULT_DTYPE}")
    with tempfile.TemporaryDirectory(prefix="lora-extract-defaults-") as tmp:
        work = Path(tmp)
        cases = build_cases(work, args.shares, args.share)
        results = {name: run_case(name, m1, m2, args.ranks, work, d)
                   for name, (m1, m2, d) in cases.items()}
    block_rank = BAKED_RANK if BAKED_RANK in args.ranks else args.ranks[0]
    for name, rows in results.items():
        print_blocks(name, rows, block_rank)
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")

    at_or_above = [r for r in args.ranks if r >= BAKED_RANK]
    fp32_bakes = [*(f"baked@{s}" for s in args.shares), "baked_random"]
    goal(f"baked_rank{BAKED_RANK}_recovery_default_settings_rank_ge_{BAKED_RANK}",
         max(results[name][(r, DEFAULT_CLAMP, DEFAULT_DTYPE)]["recovery"]
             for name in fp32_bakes for r in at_or_above), 1e-3, fmt="{:.2e}")
    # the default against the clamp it replaced, in every case, rank and dtype
    worst = max(rows[(r, DEFAULT_CLAMP, d)]["error"] / rows[(r, CLAMP_QUANTILE, d)]["error"]
                for rows in results.values() for r in args.ranks for d in DTYPES)
    goal("default_clamp_error_over_clamp099_worst", worst, 1.0, fmt="{:.4f}")
    goal("zero_factor_modules_written",
         sum(row["zero"] for rows in results.values() for row in rows.values()), 0, fmt="{:.0f}")


if __name__ == "__main__":
    main()
