"""Launching and resuming a study: the only module that knows all three wings.

``prepare(cfg)`` checks everything cheap first (config, files, block names, source
compatibility — headers only), then opens the storage, loads the pipeline, binds the engine
and loads the scorers. ``optimize(ctx)`` runs trials until the study holds ``cfg.trials``
finished trials; a second worker with the same config and storage URL joins the same study.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import optuna
import torch
import yaml

from evaluators import build_scorer, score_norms
from merge_backend.checkpoint import open_checkpoint
from merge_backend.engine import MergeEngine
from merge_backend.hashing import cached_sha256, sha256_of
from merge_backend.merge_file import open_sources
from merge_backend.pipeline import load_pipeline
from merge_backend.plan import plan_merge

from . import run_folder as rf
from .config import ConfigError, StudyConfig, check_blocks
from .samplers import make_sampler
from .space import SearchSpace, warm_start_params
from .trial import StudyContext, TrialFailed, run_trial

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STUDY_ATTR_SOURCES = "sources_sha256"
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_device(cfg: StudyConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    if cfg.dtype == "auto":
        return device, torch.float32 if device.type == "cpu" else torch.float16
    return device, DTYPES[cfg.dtype]


def check_config(cfg: StudyConfig) -> SearchSpace:
    """Everything that can fail without loading a model: blocks, sources, the template recipe."""
    arch = open_checkpoint(cfg.models.model1).arch.name
    check_blocks(cfg, arch)
    space = SearchSpace(cfg, arch)
    if not space.all_params():
        raise ConfigError("nothing to search: every block is fixed")
    template = space.template()
    plan_merge(template, open_sources(template))  # architecture, keys and shapes agree
    return space


def storage_for(cfg: StudyConfig) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats, so a worker killed mid-trial leaves a FAIL, not a RUNNING."""
    url = cfg.storage or rf.default_storage(cfg.run_folder)
    if not url.startswith(("sqlite", "postgresql", "mysql")):
        return optuna.storages.get_storage(url)
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=cfg.heartbeat_seconds,
                                              grace_period=cfg.grace_seconds)
        except (IntegrityError, ProgrammingError):
            # Workers started together race to create the schema; the loser retries and
            # finds it made.
            time.sleep(0.2 * (attempt + 1))
    raise ConfigError(f"storage {url}: could not create or open the Optuna schema")


def _stored_config(cfg: StudyConfig) -> dict:
    """The parts of the config that define the study (changing them needs a new study)."""
    data = json.loads(cfg.model_dump_json())
    return {k: data[k] for k in ("models", "merge", "probes", "scorers", "objective")}


def open_study(cfg: StudyConfig, space: SearchSpace) -> tuple[optuna.Study, rf.RunFolder]:
    folder = cfg.run_folder
    folder.mkdir(parents=True, exist_ok=True)
    storage = storage_for(cfg)
    url = cfg.storage or rf.default_storage(folder)
    run = rf.RunFolder(folder, cfg.name, url)
    multi = cfg.objective == "multi"
    directions = ["maximize"] * (len([s for s in cfg.scorers if not s.penalty]) if multi else 1)
    study = optuna.create_study(study_name=cfg.name, storage=storage, load_if_exists=True,
                                sampler=make_sampler(cfg.sampler, multi), directions=directions)
    stored = study.user_attrs.get("config")
    if stored is not None and stored != _stored_config(cfg):
        raise ConfigError(f"study {cfg.name!r} in {url} was started with a different models / "
                          "merge / probes / scorers config; give the new config another name")
    if stored is None:
        study.set_user_attr("config", _stored_config(cfg))
        study.set_user_attr(rf.STUDY_ATTR_PROBES, json.loads(cfg.probes.model_dump_json()))
        study.set_user_attr(rf.STUDY_ATTR_SCORERS, [s.label for s in cfg.scorers])
        study.set_user_attr("arch", space.arch_name)
        study.set_user_attr("params", {p.name: list(p.blocks) for p in space.all_params()})
    run.save()
    if not run.config_path.exists():
        run.config_path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()),
                                                  sort_keys=False))
    return study, run


def record_sources(study: optuna.Study, space: SearchSpace, log: Log = _stderr) -> None:
    """Every source checkpoint and LoRA's sha256, recorded by the first worker and checked by
    each later one: a worker whose files differ (another machine, a file changed since the
    study began) stops before scoring candidates of another merge. Recipes carry the digests,
    so an export refuses a source that changed after the trial was scored."""
    files = {**space.source_files(), **space.lora_files()}
    if not cached_sha256(files.values()):
        log(f"hashing {len(files)} source file(s) once (remembered for later runs)")
    digests = {role: sha256_of(path) for role, path in files.items()}
    stored = study.user_attrs.get(STUDY_ATTR_SOURCES)
    if stored is None:
        study.set_user_attr(STUDY_ATTR_SOURCES, digests)
    else:
        for role, digest in digests.items():
            if stored.get(role) != digest:
                raise ConfigError(
                    f"{files[role]} ({role}): its sha256 is {digest[:12]}…, but study "
                    f"{study.study_name!r} was started with {str(stored.get(role))[:12]}…; every "
                    "worker needs the same files, unchanged since the study began")
    space.digests = {files[role]: digest for role, digest in digests.items()}


def enqueue_warm_starts(study: optuna.Study, space: SearchSpace) -> None:
    for label, params in warm_start_params(space):
        study.enqueue_trial(params, user_attrs={"warm_start": label}, skip_if_exists=True)


def prepare(cfg: StudyConfig, log: Log = _stderr) -> tuple[optuna.Study, StudyContext]:
    """Validate, open the study, load the pipeline, bind the engine, load the scorers."""
    space = check_config(cfg)
    configs = list(cfg.scorers)  # files were checked when the config was parsed
    study, run = open_study(cfg, space)
    record_sources(study, space, log)
    device, dtype = resolve_device(cfg)
    pipe = load_pipeline(cfg.models.model1, config_folder=cfg.config_folder, device=device,
                         dtype=dtype)
    engine = MergeEngine(pipe, space.template(), device=device, memory=cfg.memory,
                         source_dtype=dtype)
    log(engine.memory.describe())
    scorers = [build_scorer(c, device=device) for c in configs]
    ctx = StudyContext(cfg, space, engine, pipe, cfg.probes, scorers, score_norms(configs), run,
                       run.artifact_store())
    enqueue_warm_starts(study, space)
    return study, ctx


def finished(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=states))


def optimize(study: optuna.Study, ctx: StudyContext, *, trials: int | None = None,
             timeout: float | None = None, callbacks=(), log: Log = _stderr) -> int:
    """Run trials until the study holds ``trials`` finished ones (or ``timeout``); returns how
    many this call ran. Ctrl-C stops after recording what finished."""
    target = trials or ctx.cfg.trials
    remaining = target - finished(study)
    if remaining <= 0:
        log(f"study {study.study_name!r} already holds {finished(study)} finished trials")
        return 0
    before = finished(study)
    stop = optuna.study.MaxTrialsCallback(
        target, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL))
    try:
        study.optimize(lambda t: run_trial(t, ctx), n_trials=remaining,
                       timeout=timeout or ctx.cfg.timeout, catch=(TrialFailed, RuntimeError, ValueError),
                       callbacks=[stop, *callbacks], gc_after_trial=False)
    except KeyboardInterrupt:
        log(f"\ninterrupted: {finished(study)} finished trials are stored; run the same command "
            "to resume")
    return finished(study) - before
