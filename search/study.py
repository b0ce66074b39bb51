"""Launching and resuming a study: the only module that knows all three wings.

``prepare(cfg)`` does every start-up check before it creates anything: the config, the files
and block names (headers only), the device, the storage, an existing study's config and
sources; then loads the pipeline, binds the engine and loads the scorers, one line per phase.
Only when all of that worked does it create the run folder, the study and ``run.json``, so a
failed start leaves nothing behind. ``optimize`` (``search.worker``) runs the trials; a second
worker with the same config and storage URL joins the same study.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml

from evaluators import ScorerError, build_scorer, score_norms
from merge_backend.atomic_files import atomic_write_text
from merge_backend.checkpoint import open_checkpoint
from merge_backend.devices import usable_device
from merge_backend.dtypes import DTYPES
from merge_backend.engine import MergeEngine
from merge_backend.hashing import cached_sha256, sha256_of
from merge_backend.merge_file import open_sources
from merge_backend.output_files import check_output_folder
from merge_backend.pipeline import load_pipeline
from merge_backend.plan import plan_merge

from . import run_folder as rf
from . import warm_starts
from .config import PERSON, ConfigError, StudyConfig, check_blocks, map_paths
from .opening import Opening, wait_for_opening
from .samplers import make_sampler
from .space import SearchSpace, warm_start_params
from .trial import StudyContext
from .worker import WorkerResult, optimize

__all__ = ["WorkerResult", "check_config", "optimize", "prepare", "resolve_device"]

STUDY_ATTR_SOURCES = "sources_sha256"
STUDY_ATTR_WARM = "warm_starts_enqueued"
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_device(cfg: StudyConfig) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the config asks for; ConfigError when this machine lacks it."""
    try:
        device = usable_device(cfg.device, "device:")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return device, DTYPES[cfg.resolved_dtype()]


def check_config(cfg: StudyConfig) -> SearchSpace:
    """Everything that can fail without loading a model: blocks, sources, the template recipe."""
    arch = open_checkpoint(cfg.models.model1).arch.name
    check_blocks(cfg, arch)
    space = SearchSpace(cfg, arch)
    if not space.all_params():
        raise ConfigError("merge.fixed: nothing to search: every block is fixed")
    template = space.template()
    plan_merge(template, open_sources(template))  # architecture, keys and shapes agree
    _check_screening(cfg, len(space.all_params()))
    return space


def _check_screening(cfg: StudyConfig, parameters: int) -> None:
    """``screening.after`` against the searched parameters (known once the space is built)."""
    if cfg.screening is None:
        return
    from .screening import min_trials

    after, least = cfg.screening.after or min_trials(parameters), min_trials(parameters)
    if after < least:
        raise ConfigError(f"screening.after: {after} trials are too few to estimate the "
                          f"influence of {parameters} searched parameters (2 coefficients "
                          f"each); use at least {least}, or leave `after` out")
    if after >= cfg.trials:
        raise ConfigError(f"screening.after: {after} is not below trials ({cfg.trials}): "
                          f"screening would never run; raise `trials` or fix blocks")


# ---------------------------------------------------------------------------- storage


def storage_url(cfg: StudyConfig) -> str:
    return cfg.storage or rf.default_storage(cfg.run_folder)


def storage_for(cfg: StudyConfig) -> optuna.storages.BaseStorage:
    """The study's storage (RDB with heartbeats, so a killed worker's trial can be found);
    ConfigError naming ``storage`` when it cannot be opened."""
    url = storage_url(cfg)
    try:
        return rf.open_storage(url, cfg.heartbeat_seconds, cfg.grace_seconds, worker=True)
    except Exception as exc:  # noqa: BLE001 - drivers raise their own kinds; all mean "cannot open"
        detail = rf.storage_reason(exc)
        where = "storage" if cfg.storage else f"the run folder's database {url}"
        driver = "(pip install 'mergesearch[postgres]')" if url.startswith("postgres") else \
            "for its database (SQLAlchemy's dialects list them)"
        raise ConfigError(f"{where}: cannot open {url}: {detail}; check the URL, that the "
                          f"server runs and accepts this user, and that the driver is installed "
                          f"{driver}") from None


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config with file paths cut to their names: workers may keep the same files in
    other folders (the sources' sha256 say whether they are the same files)."""
    return map_paths(config, lambda p: Path(p).name if isinstance(p, str) else p)


def _stored_config(cfg: StudyConfig) -> dict:
    """The parts of the config that define the study (changing them needs a new study)."""
    data = json.loads(cfg.model_dump_json())
    return {k: data[k] for k in ("models", "merge", "probes", "scorers", "objective")}


def _existing_study(cfg: StudyConfig, storage, log: Log) -> optuna.Study | None:
    """The study of this name in ``storage``, checked against ``cfg``; None when there is none
    (or it never ran a trial and was made with another config: then it is made again)."""
    try:
        study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=_sampler(cfg))
    except KeyError:
        return None
    if _same_config(study, cfg):
        return study
    ran = [t for t in study.get_trials(deepcopy=False)
           if t.state != optuna.trial.TrialState.WAITING]
    if ran:
        raise _other_config(cfg, len(ran))
    log(f"study {cfg.name!r} never ran a trial; making it again with this config")
    optuna.delete_study(study_name=cfg.name, storage=storage)
    return None


def _same_config(study: optuna.Study, cfg: StudyConfig) -> bool:
    stored = study.user_attrs.get("config")
    return stored is None or _comparable(stored) == _comparable(_stored_config(cfg))


class OtherConfigError(ConfigError):
    """The study of this name was started with another config (it cannot be resumed)."""


def _other_config(cfg: StudyConfig, trials: int) -> ConfigError:
    return OtherConfigError(f"name: study {cfg.name!r} in {storage_url(cfg)} was started with "
                            "another models / merge / probes / scorers / objective config and "
                            f"holds {trials} trial(s); give the new config another name")


def _sampler(cfg: StudyConfig):
    return make_sampler(cfg.sampler.name, cfg.sampler.seed, cfg.sampler.options)


def _directions(cfg: StudyConfig) -> list[str]:
    objectives = [s for s in cfg.scorers if not s.penalty]
    return ["maximize"] * (len(objectives) if cfg.objective == "multi" else 1)


def metric_names(cfg: StudyConfig) -> list[str]:
    """The objectives' names the dashboard shows (instead of "Objective 0")."""
    objectives = [s.label for s in cfg.scorers if not s.penalty]
    if cfg.objective == "multi":
        return objectives
    if cfg.objective in PERSON:
        return ["your choice (values unused)"]
    return [objectives[0] if len(objectives) == 1 else "weighted score: " + " + ".join(
        f"{s.weight:g}·{s.label}" for s in cfg.scorers if not s.penalty)]


def _create_study(cfg: StudyConfig, storage, space: SearchSpace) -> optuna.Study:
    if cfg.objective in PERSON:
        from .preference import create

        study = create(cfg, storage, _sampler(cfg))
    else:
        study = optuna.create_study(study_name=cfg.name, storage=storage, load_if_exists=True,
                                    sampler=_sampler(cfg), directions=_directions(cfg))
    if study.metric_names is None:
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names(cfg))
    if not _same_config(study, cfg):  # another worker made it a moment ago, differently
        raise _other_config(cfg, len(study.get_trials(deepcopy=False)))
    if "config" not in study.user_attrs:
        study.set_user_attr(rf.STUDY_ATTR_PROBES, json.loads(cfg.probes.model_dump_json()))
        study.set_user_attr(rf.STUDY_ATTR_SCORERS, [s.label for s in cfg.scorers])
        study.set_user_attr("arch", space.arch_name)
        study.set_user_attr("params", space.param_blocks())
        study.set_user_attr("config", _stored_config(cfg))  # last: it marks the study complete
    return study


def _write_run_folder(cfg: StudyConfig) -> rf.RunFolder:
    run = rf.RunFolder(cfg.run_folder, cfg.name, storage_url(cfg), cfg.heartbeat_seconds,
                       cfg.grace_seconds)
    run.save()
    text = yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
    atomic_write_text(run.config_path, text)
    return run


# ---------------------------------------------------------------------------- sources


def hash_sources(space: SearchSpace, log: Log = _stderr) -> dict[str, str]:
    """Every source checkpoint's and LoRA's sha256, by role (remembered across runs)."""
    files = {**space.source_files(), **space.lora_files()}
    if not cached_sha256(files.values()):
        log(f"hashing {len(files)} source file(s) once (remembered for later runs)")
    return {role: sha256_of(path) for role, path in files.items()}


def check_sources(study: optuna.Study, space: SearchSpace, digests: dict[str, str]) -> None:
    """The first worker records the sources' sha256; each later one must have the same files:
    a worker whose files differ (another machine, a file changed since the study began) stops
    before scoring candidates of another merge. Recipes carry the digests, so an export refuses
    a source that changed after the trial was scored."""
    files = {**space.source_files(), **space.lora_files()}
    stored = study.user_attrs.get(STUDY_ATTR_SOURCES)
    if stored is not None:
        for role, digest in digests.items():
            if stored.get(role) != digest:
                raise ConfigError(
                    f"{files[role]} ({role}): its sha256 is {digest[:12]}…, but study "
                    f"{study.study_name!r} was started with {str(stored.get(role))[:12]}…; every "
                    "worker needs the same files, unchanged since the study began")
    space.digests = {files[role]: digest for role, digest in digests.items()}


def enqueue_warm_starts(study: optuna.Study, space: SearchSpace, log: Log = _stderr) -> None:
    """Warm starts go into the queue once per study (not again on resume or in other workers)."""
    if study.user_attrs.get(STUDY_ATTR_WARM):
        return
    starts = warm_start_params(space)
    for label, params in starts:
        warm_starts.enqueue(study, label, params, skip_if_exists=True)
    study.set_user_attr(STUDY_ATTR_WARM, True)
    if starts:
        log(f"queued {len(starts)} warm start(s): {', '.join(label for label, _ in starts)}")


# ---------------------------------------------------------------------------- start-up


def candidate_pipeline(cfg: StudyConfig, space: SearchSpace, device: torch.device,
                       dtype: torch.dtype) -> tuple[Any, MergeEngine]:
    """model1's pipeline, and the merge engine that builds each candidate in it."""
    pipe = load_pipeline(cfg.models.model1, config_folder=cfg.config_folder, device=device,
                         dtype=dtype)
    return pipe, MergeEngine(pipe, space.template(), device=device, memory=cfg.memory)


def check_run_folder(cfg: StudyConfig) -> None:
    """The run folder (``output``/NAME) is a folder or can be made there, and takes new files:
    an ``output`` that is a file, or read-only, is found before anything loads."""
    if cfg.run_folder.exists() and not cfg.run_folder.is_dir():
        raise ConfigError(f"output: {cfg.run_folder} is a file; the run folder (output/NAME) "
                          "must be a folder")
    check_output_folder(cfg.run_folder / rf.RUN_FILE, ConfigError)


def prepare(cfg: StudyConfig, log: Log = _stderr) -> tuple[optuna.Study, StudyContext]:
    """Check, load, then open the study (see the module docstring)."""
    started = time.perf_counter()
    log(f"checking the config, the sources and the device for study {cfg.name!r}")
    space = check_config(cfg)
    check_run_folder(cfg)
    device, dtype = resolve_device(cfg)
    url = storage_url(cfg)
    db_file = rf.sqlite_file(url)
    if cfg.storage and db_file is not None and not db_file.parent.is_dir():
        raise ConfigError(f"storage: {url}: folder {db_file.parent} does not exist; create it "
                          "or use another path")
    # a new SQLite database (the run folder's) is made last; a server is reached now. A
    # database without run.json may be another worker's, still opening: wait for it first
    if db_file is not None and db_file.exists() and not (cfg.run_folder / rf.RUN_FILE).exists():
        wait_for_opening(cfg.run_folder)
    storage = None if db_file is not None and not db_file.exists() else storage_for(cfg)
    study = _existing_study(cfg, storage, log) if storage is not None else None
    digests = hash_sources(space, log)
    if study is not None:
        check_sources(study, space, digests)
    log(f"loading {Path(cfg.models.model1).name} into a pipeline on {device} "
        f"({str(dtype).removeprefix('torch.')})")
    pipe, engine = candidate_pipeline(cfg, space, device, dtype)
    log(engine.memory.describe())
    for lora in engine.lora_files:  # what a partial LoRA skips, named
        for note in lora.notes():
            log(f"note: {note}")
    scorers = []
    for i, config in enumerate(cfg.scorers):
        log(f"loading scorer {config.label!r} ({config.kind})")
        try:
            scorers.append(build_scorer(config, device=device))
        except ScorerError as exc:
            detail = " ".join(str(exc).split())
            detail = detail if len(detail) <= 400 else detail[:400] + " …"
            raise ConfigError(f"scorers[{i}]: {detail}; check that its files hold the model "
                              "its config names") from None
    log(f"opening study {cfg.name!r} in {url}")
    # one worker at a time from here to run.json (search/opening.py); a new database: stopped
    # before run.json is written (Ctrl-C, an error), the worker that made it takes the start
    # back, so a failed start leaves nothing behind
    with Opening(cfg.run_folder, db_file) as opening:
        try:
            if storage is None:
                opening.claim()
                storage = storage_for(cfg)
            if study is None:
                study = _create_study(cfg, storage, space)
                log(f"created study {cfg.name!r}")
            if STUDY_ATTR_SOURCES not in study.user_attrs:
                study.set_user_attr(STUDY_ATTR_SOURCES, digests)
            check_sources(study, space, digests)
            run = _write_run_folder(cfg)
        except BaseException:
            opening.undo(storage)
            raise
    enqueue_warm_starts(study, space, log)
    ctx = StudyContext(cfg, space, engine, pipe, cfg.probes, scorers, score_norms(cfg.scorers),
                       run, run.artifact_store(), residual_scorer=cfg.residual_scorer())
    log(f"ready in {time.perf_counter() - started:.1f} s")
    return study, ctx
