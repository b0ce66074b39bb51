"""A queued warm start (a fixed ratio vector tried before the sampler: model1, model2, the
uniform merges, presets, curves): how a trial is known to be one, and queueing it again.

Warm starts are queued once per study (``search.study.enqueue_warm_starts``). One whose trial
did not finish — interrupted with Ctrl-C, or left RUNNING by a killed worker and failed as
stale — is queued again with the same label and parameters, so a resumed study still tries it.
"""

from __future__ import annotations

import optuna

from .run_folder import ATTR_WARM_START


def warm_start_of(trial: optuna.trial.FrozenTrial) -> tuple[str, dict] | None:
    """A queued warm start's label and fixed parameters; None for any other trial."""
    label = trial.user_attrs.get(ATTR_WARM_START)
    params = trial.system_attrs.get("fixed_params")
    return (label, params) if label and params else None


def enqueue(study: optuna.Study, label: str, params: dict, skip_if_exists: bool = False) -> None:
    study.enqueue_trial(params, user_attrs={ATTR_WARM_START: label},
                        skip_if_exists=skip_if_exists)


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue ``trial`` (as stored) again when it is a warm start."""
    start = warm_start_of(trial)
    if start is not None:
        enqueue(study, *start)
