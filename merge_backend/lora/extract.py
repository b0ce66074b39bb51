"""A LoRA from the difference of two checkpoints (model1 - model2), like ComfyUI's LoraSave.

Per layer, in float32 on ``device``: the difference (a 3x3 conv flattened to out x in·9),
its best rank-``r`` approximation with r = min(rank, out, in) (``svd.py``: ``auto`` reaches the
exact SVD's error, ``exact`` computes it directly, ``lowrank`` is faster and slightly worse),
``up = U·diag(S)``, ``down = Vh``, clipped at a quantile of their magnitudes only when ``clamp``
is one (ComfyUI and kohya clamp at 0.99; ``svd.DEFAULT_CLAMP`` says why the default does not).
Modules the two models hold unchanged are skipped (no zero factors written; ``skipped``
counts them): "unchanged" means model1 - model2 is exactly zero in every element (float32),
i.e. the files hold the same values there. No tolerance: a threshold is a guess about the
scale of a change (kohya skips a text encoder whose largest change is at most 0.01, whatever
the weights' own scale), while an exact zero is what a module a fine-tune never touched
gives, and a small real difference costs only its factors.

Every 2-D weight ComfyUI's LoraSave factorises is factorised, text-encoder token and position
embeddings included (in the ComfyUI format: kohya-format readers have no name for embeddings,
so kohya files leave them out and say so). ``full_diff`` stores every difference whole
(``.diff``). ``bias_diff`` adds 1-D weight differences (``.diff``: norms) and bias differences
(``.diff_b``), as LoraSave does by default; it is on by default for the ComfyUI format and off
for kohya's (diffusers refuses ``.diff`` keys; ComfyUI reads them).

The file streams to disk as layers are factorized (atomic, like every mergesearch output).
kohya files (default) carry ``alpha = rank`` in every module so diffusers reads them exactly;
ComfyUI files are fp16 with ``diffusion_model.`` keys and no alpha.

Example:
    >>> result = extract_lora("finetune.safetensors", "base.safetensors", "diff.safetensors",
    ...                       rank=32)                           # doctest: +SKIP
    >>> print(result.table.format())                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from merge_backend.architectures import report_block
from merge_backend.checkpoint import Checkpoint, open_checkpoint
from merge_backend.dtypes import DTYPES
from merge_backend.hashing import sha256_of
from merge_backend.naming import swap_halves
from merge_backend.safetensors_io import PlannedTensor, stream_safetensors
from merge_backend.source_files import holds, resolved

from .formats import (
    WRITE_FORMATS,
    LoraError,
    LoraModule,
    check_lora_output,
    lora_entries,
    lora_metadata,
)
from .names import NameTable, Target, name_table
from .quality import ErrorTable
from .svd import (
    DEFAULT_CLAMP,
    DEFAULT_FACTOR_DTYPE,
    SVD_METHODS,
    check_clamp,
    clamp_factors,
    factorize_with_method,
    shaped,
)

LORA_TYPES = ("standard", "full_diff")
Progress = Callable[[int, int, str], None]


@dataclass
class ExtractResult:
    """What ``extract_lora`` wrote and how well the LoRA reproduces the difference.

    Example:
        >>> r = extract_lora("a.safetensors", "b.safetensors", "d.safetensors")  # doctest: +SKIP
        >>> r.table.overall, r.svd_methods                                       # doctest: +SKIP
        (0.41, {'lowrank': 270, 'exact': 11})
    """

    output: Path
    rank: int  # as asked (the files' network dim and alpha)
    table: ErrorTable
    modules: int
    seconds: float
    svd_methods: dict[str, int]
    notes: list[str] = field(default_factory=list)
    skipped: int = 0  # modules left out because model1 and model2 hold the same values
    max_rank: int = 0  # the largest rank a module was written with (min(rank, out, in) each)

    def report(self) -> str:
        """The per-block error table and what was skipped: what ``lora extract`` and
        ``export --to lora`` print."""
        lines = [self.table.format()]
        if self.skipped:
            lines.append(f"skipped {self.skipped} unchanged module(s) of "
                         f"{self.skipped + self.modules} (model1 = model2 there; no factors "
                         "written)")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    """One module to write: how its difference is stored."""

    target: Target
    shape: tuple[int, ...]  # the diffusers-module shape of the weight
    weight: str  # "lora", "diff" or "none"
    bias_rows: int | None  # diff_b length, or None


def _diffusers_shape(target: Target, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(target.view(torch.empty(shape, device="meta")).shape)


def _plan(table: NameTable, m1: Checkpoint, m2: Checkpoint, components: list[str],
          lora_type: str, bias_diff: bool, fmt: str, notes: list[str]) -> list[_Job]:
    jobs, skipped = [], []
    for target in table.components(components):
        if target.key not in m1:
            if target.key in m2:  # skipping it would leave a difference out without a word
                raise LoraError(f"{m1.path} lacks {target.key}, which {m2.path} has; extract a "
                                "LoRA from two models of the same shape")
            continue
        for key in filter(None, (target.key, target.bias_key)):
            if key not in m2 or m1.shape(key) != m2.shape(key):
                other = list(m2.shape(key)) if key in m2 else "no such key"
                raise LoraError(f"{m1.path} and {m2.path} differ at {key}: {list(m1.shape(key))} "
                                f"vs {other}; extract a LoRA from two models of the same shape")
            for m in (m1, m2):
                if not m.dtype(key).is_floating_point:
                    raise LoraError(f"{m.path}: tensor {key} is "
                                    f"{str(m.dtype(key)).removeprefix('torch.')}, not floating "
                                    "point; a LoRA is a difference of float weights")
        shape = _diffusers_shape(target, m1.shape(target.key))
        if lora_type == "full_diff":
            weight = "diff"
        elif len(shape) >= 2 and (target.lora_able or fmt == "comfyui"):
            weight = "lora"  # LoraSave factorises every 2-D weight (embeddings too)
        elif len(shape) >= 2:
            weight = "none"
            skipped.append(target.module)
        else:
            weight = "diff" if bias_diff else "none"
        bias = None
        if bias_diff and target.bias_key and target.bias_key in m1:
            whole = math.prod(m1.shape(target.bias_key))
            bias = target.rows(whole).stop - target.rows(whole).start
        if weight != "none" or bias is not None:
            jobs.append(_Job(target, shape, weight, bias))
    unnamed = [job.target for job in jobs if not table.can_name(job.target, fmt)]
    if unnamed:  # found before any tensor is read
        first = unnamed[0]
        raise LoraError(f"{m1.path}: a {fmt}-format LoRA has no name for {len(unnamed)} of "
                        f"{m1.arch.title}'s modules, first {first.module} ({first.key}"
                        f"{', a part of a fused tensor' if first.parts > 1 else ''}); "
                        f"mergesearch cannot extract a LoRA from this architecture in that "
                        "format")
    if skipped:
        notes.append(f"left out {len(skipped)} text-encoder embedding(s) ({', '.join(skipped)}): "
                     "kohya-format readers have no name for them; --format comfyui holds them")
    return jobs


def _layout_module(job: _Job, rank: int) -> LoraModule:
    """A LoraModule of meta tensors with the shapes the job will write."""
    meta = {"device": "meta"}
    module = LoraModule(job.target)
    if job.weight == "lora":
        out, inner = job.shape[0], math.prod(job.shape[1:])
        r = min(rank, out, inner)
        up, down = shaped(torch.empty(out, r, **meta), torch.empty(r, inner, **meta), job.shape)
        module.up, module.down, module.alpha = up, down, float(rank)
    elif job.weight == "diff":
        module.diff = torch.empty(job.shape, **meta)
    if job.bias_rows is not None:
        module.diff_b = torch.empty(job.bias_rows, **meta)
    return module


class _Extractor:
    """Turns each job into the module that is written, recording its error."""

    def __init__(self, arch, rank: int, fmt: str, dtype: torch.dtype, clamp: float | None, svd: str,
                 device: torch.device):
        self.arch, self.rank, self.fmt, self.dtype = arch, rank, fmt, dtype
        self.clamp, self.svd, self.device = clamp, svd, device
        self.alpha = float(rank) if fmt == "kohya" else None
        self.table = ErrorTable()
        self.methods: dict[str, int] = {}

    def block(self, key: str) -> str:
        return report_block(self.arch, key)

    def factor(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        mat_shape = (delta.shape[0], math.prod(delta.shape[1:]))
        r = min(self.rank, *mat_shape)
        up, down, method = factorize_with_method(delta, r, method=self.svd)
        self.methods[method] = self.methods.get(method, 0) + 1
        if self.clamp is not None:
            up, down = clamp_factors(up, down, self.clamp)
        if self.alpha is not None:
            up = up * (r / self.alpha)  # alpha = rank in every module; the delta stays exact
        return shaped(up.to(self.dtype), down.to(self.dtype), tuple(delta.shape))

    def module(self, job: _Job, delta: Tensor | None, bias: Tensor | None) -> LoraModule:
        module = LoraModule(job.target)
        block = self.block(job.target.key)
        if job.weight == "lora":
            module.up, module.down = self.factor(delta)
            module.alpha = self.alpha
            self.table.record(block, delta, module.delta(self.device))
        elif job.weight == "diff":
            module.diff = delta.to(self.dtype)
            self.table.record(block, delta, module.diff.float())
        if bias is not None:
            module.diff_b = bias.to(self.dtype)
            self.table.record(block, bias, module.diff_b.float())
        return module


def _differences(jobs: list[_Job], m1: Checkpoint, m2: Checkpoint, device: torch.device
                 ) -> Iterator[tuple[_Job, Tensor | None, Tensor | None]]:
    """(job, weight difference, bias difference) in float32 on ``device``, one job at a time."""
    cache: dict[str, Tensor] = {}

    def diff(key: str) -> Tensor:
        if key not in cache:
            cache.clear()  # q/k/v chunks of one key come together; keep only the last key
            a = m1.get(key).to(device=device, dtype=torch.float32)
            cache[key] = a - m2.get(key).to(device=device, dtype=torch.float32)
        return cache[key]

    for job in jobs:
        t = job.target
        weight = t.view(diff(t.key)) if job.weight != "none" else None
        bias = None
        if job.bias_rows is not None:
            flat = diff(t.bias_key).reshape(-1)
            bias = flat[t.rows(flat.shape[0])]
            bias = swap_halves(bias) if t.swap else bias
        yield job, weight, bias


def _changed(jobs: list[_Job], m1: Checkpoint, m2: Checkpoint) -> list[_Job]:
    """The jobs with what model1 and model2 hold unchanged dropped (see module docstring).

    Reads every tensor the jobs use once, in its stored dtype: NaN / inf raise here, before
    the long work (the SVDs), and equal stored values are exactly a zero difference."""
    pairs: dict[str, tuple[Tensor, Tensor]] = {}

    def same(key: str, rows: Callable[[int], slice], flat: bool) -> bool:
        if key not in pairs:
            if len(pairs) >= 2:  # q/k/v chunks and their bias come together; keep two keys
                old = next(iter(pairs))
                del pairs[old]
                m1.release(old)
                m2.release(old)
            a, b = m1.get(key), m2.get(key)
            pairs[key] = (a, b) if a.dtype == b.dtype else (a.float(), b.float())
        a, b = (t.reshape(-1) if flat else t for t in pairs[key])
        part = rows(a.shape[0])
        return torch.equal(a[part], b[part])

    kept = []
    for job in jobs:
        t = job.target
        weight = job.weight != "none" and not same(t.key, t.rows, flat=False)
        bias = job.bias_rows is not None and not same(t.bias_key, t.rows, flat=True)
        if weight or bias:
            kept.append(_Job(t, job.shape, job.weight if weight else "none",
                             job.bias_rows if bias else None))
    return kept


def check_names(model: Checkpoint, fmt: str, bias_diff: bool | None = None,
                text_encoder: bool = True) -> None:
    """LoraError now, reading no tensor, when ``fmt`` has no name for a module an extraction
    from ``model``'s architecture would write (the check ``extract_lora`` makes on its two
    models; an export makes it while planning)."""
    table = name_table(model.arch.name)
    components = [model.arch.diffusion.name] + ([te.name for te in model.arch.text_encoders]
                                                if text_encoder else [])
    _plan(table, model, model, components, "standard",
          fmt == "comfyui" if bias_diff is None else bias_diff, fmt, [])


def _check_options(rank: int, fmt: str, lora_type: str, svd: str, dtype: str,
                   clamp: float | None) -> None:
    if rank < 1:
        raise LoraError(f"--rank must be at least 1, got {rank}")
    check_clamp(clamp, LoraError)
    for value, allowed, what in ((fmt, WRITE_FORMATS, "format"), (lora_type, LORA_TYPES, "type"),
                                 (svd, SVD_METHODS, "svd"), (dtype, tuple(DTYPES), "dtype")):
        if value not in allowed:
            raise LoraError(f"--{what} {value!r}: choose one of {', '.join(allowed)}")


def extract_lora(model1: str | Path, model2: str | Path, output: str | Path, *, rank: int = 8,
                 text_encoder: bool = False, fmt: str = "kohya", lora_type: str = "standard",
                 clamp: float | None = DEFAULT_CLAMP, bias_diff: bool | None = None,
                 svd: str = "auto",
                 device: str | torch.device = "cpu", dtype: str = DEFAULT_FACTOR_DTYPE,
                 overwrite: bool = False,
                 progress: Progress | None = None) -> ExtractResult:
    """Extract ``model1 - model2`` as a LoRA file at ``output`` (see module docstring).

    ``clamp``: None (no clamp) or the quantile to clip the factors at. ``bias_diff`` None: on
    for ``fmt="comfyui"`` (as LoraSave), off for kohya (diffusers cannot read ``.diff`` keys)."""
    start = time.perf_counter()
    _check_options(rank, fmt, lora_type, svd, dtype, clamp)
    if bias_diff is None:
        bias_diff = fmt == "comfyui"
    output, device = Path(output), torch.device(device)
    check_lora_output(output, overwrite)
    m1, m2 = open_checkpoint(model1), open_checkpoint(model2)
    for m in (m1, m2):
        if holds(resolved(m.path, LoraError), resolved(output, LoraError)):
            raise LoraError(f"output {output} is a source model or inside one; choose another "
                            "path")
    if m1.arch.name != m2.arch.name:
        raise LoraError(f"{m1.path} is {m1.arch.title} but {m2.path} is {m2.arch.title}; "
                        "a LoRA is the difference of two models of one architecture")
    table = name_table(m1.arch.name)
    components = [m1.arch.diffusion.name] + ([te.name for te in m1.arch.text_encoders]
                                             if text_encoder else [])
    notes: list[str] = []
    jobs = _plan(table, m1, m2, components, lora_type, bias_diff, fmt, notes)
    planned_jobs = len(jobs)
    jobs = _changed(jobs, m1, m2)  # reads each tensor once: NaN / inf raise before the SVDs
    if not jobs:
        raise LoraError(f"{m1.path} and {m2.path} hold the same values in every module extracted "
                        f"({', '.join(components)}): there is no difference to extract")
    max_rank = max((min(rank, job.shape[0], math.prod(job.shape[1:])) for job in jobs
                    if job.weight == "lora"), default=0)
    if 0 < max_rank < rank:
        notes.append(f"rank {rank} is above every module's full rank (at most {max_rank}): "
                     "each module is stored exactly, at its full rank")
    out_dtype = DTYPES[dtype]
    alpha = float(rank) if fmt == "kohya" else None
    planned = [PlannedTensor(k, out_dtype, tuple(v.shape)) for job in jobs
               for k, v in lora_entries(table, _layout_module(job, rank), fmt, out_dtype, alpha)]
    work = _Extractor(m1.arch, rank, fmt, out_dtype, clamp, svd, device)

    def values() -> Iterator[Tensor]:
        for i, (job, weight, bias) in enumerate(_differences(jobs, m1, m2, device)):
            module = work.module(job, weight, bias)
            for _, value in lora_entries(table, module, fmt, out_dtype, alpha):
                yield value.cpu()
            if progress:
                progress(i + 1, len(jobs), job.target.key)

    info = {"model1": str(m1.path), "model2": str(m2.path), "model1_sha256": sha256_of(m1.path),
            "model2_sha256": sha256_of(m2.path), "rank": rank, "type": lora_type,
            "clamp": clamp, "bias_diff": bias_diff, "svd": svd, "text_encoder": text_encoder}
    meta = lora_metadata(m1.arch, fmt, output.stem, rank, alpha,
                         {"mergesearch.extract": json.dumps(info, sort_keys=True)})
    stream_safetensors(output, planned, values(), meta, replace=overwrite)
    return ExtractResult(output, rank, work.table, len(jobs), time.perf_counter() - start,
                         work.methods, notes, planned_jobs - len(jobs), max_rank)
