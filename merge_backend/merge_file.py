"""Merging checkpoints on disk, streamed: what ``mergesearch merge`` and the export run.

One tensor from each source is read, merged in float32, cast and written before the next is
read, so peak memory is a few tensors, not the sum of inputs and output. The output is what
ComfyUI's CheckpointSave writes: one original-layout ``.safetensors`` with ``modelspec.*``
metadata, plus the Recipe and the sources' sha256; it appears atomically or not at all.

Everything that can be checked is checked before the output is opened: the Recipe, the output
path, every source's header, keys, shapes and dtypes (``plan_merge``), the LoRAs, and then
every tensor the merge will read, for NaN and inf (one read of each source; from the page
cache it costs about 0.25 s per 2 GB, and it leaves the sources cached for the merge).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from .architectures import ARCHITECTURES, extra_tensor_value, predict_key
from .checkpoint import Checkpoint, CheckpointError, all_finite, open_checkpoint
from .dtypes import DTYPES, held
from .file_kernels import KeyArithmetic
from .hashing import sha256_of
from .lora.apply import check_loras, lora_deltas_for_key, needs_weight, uses_from_recipe
from .methods import METHODS
from .output_files import check_new_output
from .plan import KeyPlan, MergePlan, plan_merge
from .recipe import LoraSpec, Recipe, Source, uniform_ratios
from .safetensors_io import PlannedTensor, stream_safetensors
from .source_files import holds, resolved

Progress = Callable[[int, int, str], None]


class OutputPathError(ValueError):
    """The output path would overwrite a source or an existing file."""


@dataclass
class MergeResult:
    output: Path
    recipe: Recipe
    tensors: int
    merged: int
    seconds: float
    notes: list[str]
    lora_changed: int = 0  # tensors the Recipe's LoRAs changed


def open_sources(recipe: Recipe) -> dict[str, Checkpoint]:
    """Open every source of a Recipe (headers only), each file once: roles that name the same
    file (a LoRA apply merges model1 with itself) share one Checkpoint and its mapping."""
    opened: dict[str, Checkpoint] = {}
    for src in recipe.models.values():
        key = str(resolved(src.path, CheckpointError))
        if key not in opened:
            opened[key] = open_checkpoint(src.path)
    return {role: opened[str(resolved(src.path))] for role, src in recipe.models.items()}


def with_hashes(recipe: Recipe) -> Recipe:
    """The Recipe with every source's sha256 filled in (checked against any already there)."""
    hashing = SourceHashes(recipe)
    hashing.digests()
    return hashing.final_recipe


def with_lora_hashes(recipe: Recipe) -> Recipe:
    """The Recipe with each LoRA's sha256 recorded (a changed LoRA file is refused)."""
    if not recipe.loras:
        return recipe
    uses_from_recipe(recipe)  # checks recorded hashes and that each file reads
    return recipe.replace(loras=tuple(replace(spec, sha256=sha256_of(spec.path))
                                      for spec in recipe.loras))


def check_output_path(output: Path, recipe: Recipe, overwrite: bool) -> None:
    """The output is a new ``.safetensors`` path (or one ``overwrite`` allows) in a folder
    that exists or can be made, and no source or LoRA of the Recipe."""
    output = Path(output)
    if output.suffix != ".safetensors":
        raise OutputPathError(f"output {output} must end in .safetensors")
    target = resolved(output, OutputPathError)
    for role, src in recipe.models.items():
        src_path = Path(src.path)
        source = resolved(src_path, CheckpointError)
        if holds(source, target) or (  # or a hard link to it
                output.exists() and src_path.exists() and output.samefile(src_path)):
            where = "inside the" if source in target.parents else "the"
            raise OutputPathError(f"output {output} is {where} {role} source; choose another "
                                  "path (sources are never modified)")
    for spec in recipe.loras:
        if resolved(spec.path, CheckpointError) == target:
            raise OutputPathError(f"output {output} is one of the LoRAs; choose another path")
    check_new_output(output, overwrite, OutputPathError)


def merge_to_file(recipe: Recipe, output: str | Path, *, dtype: str = "fp16",
                  overwrite: bool = False, progress: Progress | None = None,
                  extra_metadata: Mapping[str, str] | None = None,
                  known_sha256: Mapping[str, str] | None = None,
                  lora_device: str | torch.device = "cpu") -> MergeResult:
    """Merge ``recipe`` into one checkpoint at ``output``. All checks run before any tensor.

    ``known_sha256``: digests (by resolved path) the caller has already computed.
    ``lora_device``: where the Recipe's LoRA deltas are computed (in float32).
    """
    start = time.perf_counter()
    output = Path(output)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    recipe.validate()
    check_output_path(output, recipe, overwrite)
    sources = open_sources(recipe)
    plan = plan_merge(recipe, sources)
    recipe = with_lora_hashes(recipe)
    plan.recipe = recipe
    # Hash the sources on background threads while the check and the merge run (hashlib
    # releases the GIL); the header carries equal-length placeholders until the digests are known.
    hashing = SourceHashes(recipe, known_sha256)
    changed = [0]
    planned, values = _execute(plan, sources, DTYPES[dtype], progress, lora_device, changed)
    metadata = checkpoint_metadata(hashing.placeholder_recipe, output, sources["model1"],
                                   extra_metadata)
    # One core is hashing: torch's other threads would only wait on it (OpenMP threads stall
    # badly when a core they need is busy), so the tensor work takes the remaining cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1) if hashing.pending else threads)
    try:
        check_sources_finite(plan, sources)
        stream_safetensors(output, planned, values, metadata, finalize=hashing.replacements,
                           replace=overwrite)
    finally:
        torch.set_num_threads(threads)
    return MergeResult(output, hashing.final_recipe, len(planned), len(plan.merged()),
                       time.perf_counter() - start, plan.notes, changed[0])


class SourceHashes:
    """sha256 of every source, computed on a thread (each file once; ``known`` digests by
    resolved path are reused, not recomputed); checked against the Recipe's own."""

    def __init__(self, recipe: Recipe, known: Mapping[str, str] | None = None):
        self.recipe = recipe
        self.pool = ThreadPoolExecutor(max_workers=1)  # one core hashes, file after file
        by_path: dict[str, Future] = {}
        for src in recipe.models.values():
            path = str(Path(src.path).resolve())
            if path not in by_path:
                by_path[path] = _done(known[path]) if known and path in known else \
                    self.pool.submit(sha256_of, src.path)
        self.futures = {role: by_path[str(Path(src.path).resolve())]
                        for role, src in recipe.models.items()}
        self.pending = any(not f.done() for f in self.futures.values())
        self.placeholders = {role: f"pending-sha256-{role}-".ljust(64, "0")
                             for role in recipe.models}
        self.placeholder_recipe = recipe.replace(models={
            role: Source(src.path, self.placeholders[role]) for role, src in recipe.models.items()})
        self.final_recipe = recipe

    def digests(self) -> dict[str, str]:
        out = {role: future.result() for role, future in self.futures.items()}
        self.pool.shutdown()
        for role, digest in out.items():
            src = self.recipe.models[role]
            if src.sha256 and src.sha256 != digest:
                raise CheckpointError(
                    f"{src.path}: sha256 is {digest[:12]}…, the recipe expects {src.sha256[:12]}… "
                    "— the file changed since the recipe was made")
        self.final_recipe = self.recipe.replace(models={
            role: Source(src.path, out[role]) for role, src in self.recipe.models.items()})
        return out

    def replacements(self) -> dict[str, str]:
        return {self.placeholders[role]: digest for role, digest in self.digests().items()}


def _execute(plan: MergePlan, sources: Mapping[str, Checkpoint], out_dtype: torch.dtype,
             progress: Progress | None, lora_device: str | torch.device, changed: list[int]
             ) -> tuple[list[PlannedTensor], Iterator[torch.Tensor]]:
    """The tensors to write and an iterator of their values; ``changed[0]`` counts the ones
    LoRAs changed. A merged value lives in a reused buffer: it must be written before the next
    one is asked for (``stream_safetensors`` does)."""
    recipe = plan.recipe
    model1 = sources["model1"]
    planned = [PlannedTensor(k.key, _out_dtype(model1.dtype(k.key), out_dtype),
                             model1.shape(k.key)) for k in plan.keys]
    defaults = checkpoint_save_defaults(model1, out_dtype)
    planned += [PlannedTensor(key, t.dtype, tuple(t.shape)) for key, t in defaults.items()]

    loras = _lora_uses(recipe, model1)
    plan.notes += [note for use in loras for note in use.lora.notes()]
    arithmetic = KeyArithmetic(out_dtype, recipe.arithmetic)
    # weight-dependent LoRA modules (DoRA, OFT, …) meet the float32 merged weight
    exact32 = KeyArithmetic(torch.float32, recipe.arithmetic) if loras else None

    def read(k: KeyPlan) -> list[torch.Tensor]:
        # check_sources_finite has read every one of these before the output was opened
        return [sources[r].get(k.key, check_finite=False) for r in _roles_of(recipe, k)]

    def values() -> Iterator[torch.Tensor]:
        total = len(plan.keys)
        # Reads run one key ahead on a thread (file reads release the GIL), so the disk, the
        # arithmetic and the writer overlap.
        with ThreadPoolExecutor(max_workers=1) as reader:
            ahead = reader.submit(read, plan.keys[0]) if plan.keys else None
            for i, k in enumerate(plan.keys):
                tensors = ahead.result()
                if i + 1 < total:
                    ahead = reader.submit(read, plan.keys[i + 1])
                use = _roles_of(recipe, k)
                precision = DTYPES[k.held] if k.held else None
                weighted = exact32 is not None and needs_weight(loras, k.key)
                delta = None if weighted else _lora_delta(loras, k.key, tensors[0], lora_device)
                changed[0] += weighted or delta is not None
                if weighted:
                    merged = _merge_then_loras(loras, k, tensors, exact32, precision,
                                               lora_device, out_dtype)
                elif k.op == "copy":
                    merged = held(tensors[0], precision)
                    if delta is not None:
                        merged = held(merged.float() + delta, precision)
                    merged = merged.to(_out_dtype(merged.dtype, out_dtype))
                else:  # into a buffer reused for the next key, once this one is written
                    merged = arithmetic.merge(METHODS[k.op], tensors, k.ratio, k.multiplier, delta,
                                              precision)
                if (k.op != "copy" or delta is not None or weighted) and not all_finite(merged):
                    _explain_non_finite(k, [sources[r] for r in use], out_dtype, recipe.arch)
                yield merged
                for r in use:
                    sources[r].release(k.key)
                if progress and (i % 64 == 0 or i == total - 1):
                    progress(i + 1, total, k.key)
        yield from defaults.values()

    return planned, values()


def _roles_of(recipe: Recipe, k: KeyPlan) -> tuple[str, ...]:
    """The sources a key is read from: model1 for a copy; text-encoder keys merge model1 with
    model2 whatever the UNet method is."""
    if k.op == "copy":
        return ("model1",)
    return ("model1", "model2") if k.block in _text_encoder_names(recipe.arch) else \
        recipe.merge_method.roles


def check_sources_finite(plan: MergePlan, sources: Mapping[str, Checkpoint]) -> None:
    """Every tensor the merge will read holds no NaN or inf (each file read once), or a
    ``CheckpointError`` names the file and the key — before the output is opened."""
    keys: dict[int, tuple[Checkpoint, dict[str, None]]] = {}
    for k in plan.keys:
        for role in _roles_of(plan.recipe, k):
            ckpt = sources[role]  # roles naming one file share one Checkpoint
            keys.setdefault(id(ckpt), (ckpt, {}))[1][k.key] = None
    for ckpt, wanted in keys.values():
        ckpt.check_finite(wanted)


def _lora_uses(recipe: Recipe, model1: Checkpoint) -> list:
    if not recipe.loras:
        return []
    uses = uses_from_recipe(recipe)
    check_loras(uses, model1)
    return uses


def _lora_delta(uses: list, key: str, stored: torch.Tensor,
                device: str | torch.device) -> torch.Tensor | None:
    """Σ strength · delta of the LoRAs on ``key`` (float32, on the CPU; computed on
    ``device``), added to the merged weight before its final cast; None when none changes it."""
    if not uses or not stored.is_floating_point():
        return None
    delta = lora_deltas_for_key(uses, key, stored.shape, device=device)
    return None if delta is None else delta.cpu()


def _merge_then_loras(uses: list, k: KeyPlan, tensors: list[torch.Tensor],
                      exact32: KeyArithmetic, precision: torch.dtype | None,
                      device: str | torch.device, out_dtype: torch.dtype) -> torch.Tensor:
    """A key some LoRA changes by a weight-dependent rule (DoRA, OFT, …): the merge in
    float32, then the LoRAs applied to that merged weight (as ComfyUI's LoraLoader after the
    merge nodes), rounded once."""
    if k.op == "copy":
        base = held(tensors[0], precision).float()
    else:
        base = exact32.merge(METHODS[k.op], tensors, k.ratio, k.multiplier, None,
                             precision).clone()
    delta = lora_deltas_for_key(uses, k.key, base.shape, device=device, base=base)
    if delta is not None:  # None: every LoRA's strength is 0 here
        base = base + delta.cpu()
    return held(base, precision).to(_out_dtype(tensors[0].dtype, out_dtype))


def _done(value: str) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _explain_non_finite(k: KeyPlan, sources: list[Checkpoint], out_dtype: torch.dtype,
                        arch: str) -> None:
    """The error for a merged value past a dtype's range, naming the narrow precisions it
    passed through: the one its part is held in (--unet-dtype / --text-encoder-dtype), where
    the merge is computed, and the file's (--dtype)."""
    for ckpt in sources:
        ckpt.get(k.key)  # raises, naming the file and the key (sources were checked: a safeguard)
    held = "--text-encoder-dtype" if k.block in _text_encoder_names(arch) else "--unet-dtype"
    steps = [(held, DTYPES[k.held])] if k.held else []
    steps.append(("--dtype", out_dtype))
    narrow = [(option, dtype) for option, dtype in steps
              if torch.finfo(dtype).max < torch.finfo(torch.float32).max]
    name = str(min((d for _, d in narrow), key=lambda d: torch.finfo(d).max, default=torch.float32)
               ).removeprefix("torch.")
    fix = " and ".join(f"{option} fp32" for option, _ in narrow) or "smaller values"
    raise CheckpointError(f"merged tensor {k.key!r} overflows {name} (the ratios, multiplier or "
                          f"LoRA strengths go too far); use {fix}"
                          + (" or smaller values" if narrow else ""))


def _text_encoder_names(arch: str) -> tuple[str, ...]:
    return tuple(te.name for te in ARCHITECTURES[arch].text_encoders)


def _out_dtype(stored: torch.dtype, wanted: torch.dtype) -> torch.dtype:
    return wanted if stored.is_floating_point else stored


def checkpoint_save_defaults(model1: Checkpoint, out_dtype: torch.dtype
                             ) -> dict[str, torch.Tensor]:
    """The tensors CheckpointSave writes whatever the sources hold (the file's
    ``extra_tensors`` marked ``always``, and ``if_absent`` ones model1 lacks)."""
    out = {}
    for extra in model1.arch.extra_tensors:
        rule = extra.checkpoint_save
        if rule == "always" or (rule == "if_absent" and extra.key not in model1):
            out[extra.key] = extra_tensor_value(extra, out_dtype)
    return out


def checkpoint_metadata(recipe: Recipe, output: Path, model1: Checkpoint,
                        extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """CheckpointSave's ``modelspec.*`` keys plus the Recipe and the sources' sha256."""
    save = ARCHITECTURES[recipe.arch].checkpoint_save
    predict = model1.metadata.get("modelspec.predict_key") or predict_key(
        model1.arch, model1.keys(), model1.get)
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": output.stem,
        "modelspec.architecture": save.architecture_for(predict),
        "modelspec.implementation": save.modelspec_implementation,
        "modelspec.predict_key": predict,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "mergesearch.recipe": recipe.to_json(),
        "mergesearch.sources": json.dumps({r: s.sha256 for r, s in recipe.models.items()}),
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    meta.update(extra or {})
    return meta


def recipe_from_checkpoint(path: str | Path) -> Recipe:
    """The Recipe stored in a checkpoint mergesearch wrote."""
    ckpt = open_checkpoint(path)
    text = ckpt.metadata.get("mergesearch.recipe")
    if text is None:
        raise CheckpointError(f"{path}: carries no mergesearch recipe metadata")
    return Recipe.from_json(text)


def apply_to_file(checkpoint: str | Path, loras: Sequence[LoraSpec], output: str | Path, *,
                  vocabulary: str | None = None, dtype: str = "fp16", overwrite: bool = False,
                  device: str | torch.device = "cpu", progress: Progress | None = None,
                  unet_dtype: str = "fp32", text_encoder_dtype: str = "fp32") -> MergeResult:
    """Write ``checkpoint`` + LoRAs as a new checkpoint, streamed by ``merge_to_file``.

    The Recipe is the checkpoint merged with itself at ratio 1.0 — model1 unchanged, as
    ComfyUI's ModelMergeSimple at 1.0 — plus ``loras``; the file carries it so it can be
    rebuilt. ``vocabulary`` names the LoRAs' ``block_strengths`` (default: the architecture's
    ``report_vocabulary``, mbw for SD). Deltas are computed in float32 on ``device`` and added
    to the weights as held in ``unet_dtype`` / ``text_encoder_dtype``
    (``text_encoder_dtype="fp16"`` is what a LoraLoader's clip strength does on ComfyUI's
    defaults); ``result.lora_changed`` counts the tensors the LoRAs changed.
    """
    arch_obj = open_checkpoint(checkpoint).arch
    arch, vocabulary = arch_obj.name, vocabulary or arch_obj.report_vocabulary
    recipe = Recipe(arch, "weighted_sum", {"model1": Source(str(checkpoint)),
                                           "model2": Source(str(checkpoint))},
                    vocabulary, uniform_ratios(arch, vocabulary, 1.0), loras=tuple(loras),
                    unet_dtype=unet_dtype, text_encoder_dtype=text_encoder_dtype)
    return merge_to_file(recipe, output, dtype=dtype, overwrite=overwrite, progress=progress,
                         extra_metadata={"mergesearch.kind": "lora_apply"}, lora_device=device)
