"""Probe sets: the fixed prompts, seeds and sampler settings every trial is drawn with.

A probe set is plain, validated data (``ProbeSet``). ``generate`` runs a diffusers pipeline on
it deterministically (one ``torch.Generator`` per seed, seeded the same way every trial) and
keeps the images in memory as one float tensor in [0, 1]; nothing touches the disk.

Example:
    >>> probes = ProbeSet(prompts=["a cat", {"text": "a dog", "weight": 2}], seeds=[0, 1],
    ...                   steps=4, width=64, height=64, scheduler="euler_a")
    >>> len(probes.jobs())
    4
    >>> images = generate(pipe, probes)                          # doctest: +SKIP
    >>> images.images.shape                                      # doctest: +SKIP
    torch.Size([4, 3, 64, 64])
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from torch import Tensor

from evaluators.schedulers import check_scheduler_name, make_scheduler
from merge_backend.yaml_files import read_yaml

_YAML_SUFFIXES = (".yaml", ".yml")


class Prompt(BaseModel):
    """One probe prompt and its weight in the per-image score average.

    Example:
        >>> Prompt(text="a castle at night", weight=2.0, negative="blurry").weight
        2.0
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1)
    weight: FiniteFloat = Field(1.0, gt=0)
    negative: str | None = None  # overrides ProbeSet.negative_prompt for this prompt


class ProbeJob(NamedTuple):
    """One image to draw: which prompt (by index) with which seed."""

    prompt_index: int
    prompt: Prompt
    seed: int


class ProbeSet(BaseModel):
    """Prompts × seeds drawn with one sampler setting; the same images every trial.

    ``prompts`` is a list (strings or ``{text, weight, negative}`` mappings) or the path of a
    prompt file: YAML (a list like the inline one, or a mapping with a ``prompts`` key) or text
    (one prompt a line, ``#`` comments, an optional ``weight | prompt`` prefix). Relative paths
    resolve against ``base_dir`` in the validation context (``from_yaml`` passes the YAML's
    folder), else the working directory.

    Example:
        >>> ProbeSet(prompts=["a cat"], seeds=[7], width=64, height=64).jobs()[0].seed
        7
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: list[Prompt] = Field(min_length=1)
    negative_prompt: str = ""
    seeds: list[int] = Field(default=[0, 1], min_length=1)
    # the upper limits are ComfyUI's (KSampler's steps, EmptyLatentImage's MAX_RESOLUTION)
    steps: int = Field(20, ge=1, le=10000)
    cfg: FiniteFloat = Field(7.0, ge=0)
    width: int = Field(512, ge=8, le=16384, multiple_of=8)
    height: int = Field(512, ge=8, le=16384, multiple_of=8)
    scheduler: str = "euler"
    batch_size: int = Field(4, ge=1)

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_from_file_or_list(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, (str, Path)):
            base_dir = (info.context or {}).get("base_dir")
            value = read_prompt_file(Path(base_dir or ".") / Path(value))
        if isinstance(value, (list, tuple)):
            return [{"text": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, seeds: list[int]) -> list[int]:
        bad = [s for s in seeds if not 0 <= s < 2**63]
        if bad:
            raise ValueError(f"seeds must be in [0, 2**63): {bad}")
        return seeds

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        return check_scheduler_name(name)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ProbeSet:
        """Read a probe set from a YAML mapping, or a study config's ``probes``; prompt files
        resolve next to it. ValueError names the file and each field that is wrong."""
        path = Path(path)
        data = read_yaml(path, ValueError)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a probe set must be a YAML mapping, "
                             f"got {type(data).__name__}")
        if isinstance(data.get("probes"), dict) and "prompts" not in data:
            data = data["probes"]  # a study config: its probe set
        try:
            return cls.model_validate(data, context={"base_dir": path.parent})
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
                               for e in exc.errors(include_url=False))
            raise ValueError(f"{path}: not a probe set ({fields})") from None

    def jobs(self) -> list[ProbeJob]:
        """Every (prompt, seed) pair, prompt-major: the order of ``ProbeImages``."""
        return [ProbeJob(i, p, s) for i, p in enumerate(self.prompts) for s in self.seeds]

    @property
    def fingerprint(self) -> str:
        """A short hash of the settings: equal fingerprints draw the same probes."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Prompts from a YAML or text file, as ``{text, weight[, negative]}`` mappings."""
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    if path.suffix.lower() in _YAML_SUFFIXES:
        data = read_yaml(path, ValueError)
        data = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise ValueError(f"prompt file {path}: expected a list of prompts or a 'prompts' key")
        return [{"text": item} if isinstance(item, str) else item for item in data]
    text = path.read_text(encoding="utf-8")
    return [_parse_prompt_line(line) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _parse_prompt_line(line: str) -> dict[str, Any]:
    head, sep, tail = line.partition("|")
    if not sep:
        return {"text": line.strip()}
    try:
        return {"text": tail.strip(), "weight": float(head)}
    except ValueError:
        # A '|' inside an ordinary prompt: only a leading number makes it a weight.
        return {"text": line.strip()}


@dataclass(frozen=True)
class ProbeImages:
    """Images drawn from a probe set, in ``ProbeSet.jobs()`` order.

    ``images`` is float32 ``[N, 3, H, W]`` in [0, 1] on the pipeline's device; ``weights``
    holds each image's prompt weight.

    Example:
        >>> probe_images = generate(pipe, probes)                       # doctest: +SKIP
        >>> probe_images.prompts[0], probe_images.seeds[0]              # doctest: +SKIP
        ('a cat', 0)
    """

    images: Tensor
    prompts: list[str]
    seeds: list[int]
    prompt_index: list[int]
    weights: Tensor

    @classmethod
    def of(cls, probe_set: ProbeSet, images: Tensor) -> ProbeImages:
        """``images`` (one per probe, in ``probe_set.jobs()`` order) with the probe set's
        prompts, seeds and prompt weights."""
        jobs = probe_set.jobs()
        return cls(images=images, prompts=[job.prompt.text for job in jobs],
                   seeds=[job.seed for job in jobs],
                   prompt_index=[job.prompt_index for job in jobs],
                   weights=torch.tensor([job.prompt.weight for job in jobs], dtype=torch.float32))

    def __len__(self) -> int:
        return self.images.shape[0]

    def grid(self, columns: int | None = None) -> Tensor:
        """All images tiled into one ``[3, H·rows, W·columns]`` tensor (one row per prompt)."""
        n = len(self)
        columns = columns or max(1, n // max(1, len(set(self.prompt_index))))
        rows = -(-n // columns)
        c, h, w = self.images.shape[1:]
        canvas = self.images.new_zeros(c, rows * h, columns * w)
        for i, image in enumerate(self.images):
            r, col = divmod(i, columns)
            canvas[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = image
        return canvas


def generate(pipe: Any, probe_set: ProbeSet,
             device: str | torch.device | None = None) -> ProbeImages:
    """Draw every probe of ``probe_set`` with ``pipe``, ``batch_size`` images per call.

    ``pipe`` is a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``. Generators live
    on ``device`` (default: the pipeline's execution device) and are seeded per image, so an
    image depends only on its prompt and seed. The scheduler named by the probe set is built
    from ``pipe.scheduler.config`` for this call; the pipeline's own scheduler is put back.
    """
    device = torch.device(device) if device is not None else _execution_device(pipe)
    jobs = probe_set.jobs()
    original_scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(probe_set.scheduler, original_scheduler)
    try:
        chunks = [_draw(pipe, probe_set, batch, device) for batch in _batches(probe_set, jobs)]
    finally:
        pipe.scheduler = original_scheduler
    return ProbeImages.of(probe_set, torch.cat(chunks))


def _negative(probe_set: ProbeSet, job: ProbeJob) -> str:
    return probe_set.negative_prompt if job.prompt.negative is None else job.prompt.negative


def _batches(probe_set: ProbeSet, jobs: list[ProbeJob]) -> list[list[ProbeJob]]:
    """Consecutive jobs, ``batch_size`` at most, never mixing empty and non-empty negatives.

    SDXL zeroes the negative embedding only when the whole call has no negative prompt, so a
    mixed batch would make an image depend on its batch mates.
    """
    batches: list[list[ProbeJob]] = []
    for job in jobs:
        last = batches[-1] if batches else None
        if (last is None or len(last) == probe_set.batch_size
                or bool(_negative(probe_set, last[0])) != bool(_negative(probe_set, job))):
            batches.append([job])
        else:
            last.append(job)
    return batches


def _draw(pipe: Any, probe_set: ProbeSet, jobs: Sequence[ProbeJob],
          device: torch.device) -> Tensor:
    generators = [torch.Generator(device=device).manual_seed(job.seed) for job in jobs]
    negatives = [_negative(probe_set, job) for job in jobs]
    # None keeps each pipeline's own empty-negative behaviour (SDXL zeroes it out).
    negative: list[str] | None = negatives if any(negatives) else None
    output = pipe(
        prompt=[job.prompt.text for job in jobs],
        negative_prompt=negative,
        num_inference_steps=probe_set.steps,
        guidance_scale=probe_set.cfg,
        width=probe_set.width,
        height=probe_set.height,
        generator=generators,
        output_type="pt",
    )
    return output.images.to(torch.float32)


def _execution_device(pipe: Any) -> torch.device:
    return getattr(pipe, "_execution_device", None) or pipe.device
