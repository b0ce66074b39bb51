"""Tables of a study for the terminal and notebooks (pandas)."""

from __future__ import annotations

import optuna
import pandas as pd

from . import preference
from . import run_folder as rf


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial: number, state, value(s), per-scorer scores, params, timings."""
    rows = []
    choices = preference.tally(study) if preference.is_preferential(study) else {}
    for t in study.get_trials(deepcopy=False):
        if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL):
            continue
        row = {"trial": t.number, "state": t.state.name}
        if t.values is not None:
            row.update({"value" if len(t.values) == 1 else f"value{i}": v
                        for i, v in enumerate(t.values)})
        row.update({f"score:{k}": v for k, v in t.user_attrs.get(rf.ATTR_SCORES, {}).items()})
        row.update(t.params)
        row.update({f"s:{k}": v for k, v in t.user_attrs.get(rf.ATTR_TIMINGS, {}).items()})
        if t.user_attrs.get(rf.ATTR_WARM_START):
            row["warm_start"] = t.user_attrs[rf.ATTR_WARM_START]
        if t.number in choices:
            wins, losses, hidden = choices[t.number]
            row.update({"wins": wins, "chosen_worst": losses, "on_page": not hidden and (
                preference.ATTR_CANDIDATE in t.user_attrs)})
        if t.state == optuna.trial.TrialState.FAIL:
            row["fail_reason"] = t.user_attrs.get(rf.ATTR_FAIL, "")
        rows.append(row)
    return pd.DataFrame(rows)


def best_table(study: optuna.Study, top: int = 5) -> pd.DataFrame:
    """The ``top`` best COMPLETE trials, best first (``run_folder.ranked``'s order)."""
    order = [t.number for t in rf.ranked(study)][:top]
    table = trials_table(study)
    if table.empty or not order:
        return table.iloc[0:0]
    return table.set_index("trial", drop=False).loc[order].reset_index(drop=True)


def status_lines(study: optuna.Study) -> list[str]:
    """Trial counts by state, the RUNNING trials (and which are stale), the best trial."""
    from .liveness import stale_trials

    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    lines = [f"study {study.study_name}: " + (", ".join(
        f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials")]
    stale = {t.number for t in stale_trials(study)}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        since = t.datetime_start.strftime("%Y-%m-%d %H:%M:%S") if t.datetime_start else "?"
        worker = t.user_attrs.get(rf.ATTR_WORKER, "an unknown worker")
        what = "STALE: its worker stopped (mergesearch status RUN --fail-stale marks it FAIL)" \
            if t.number in stale else "running"
        lines.append(f"  trial {t.number}: {what}; on {worker} since {since}")
    best = rf.best_trial(study)
    if best is None:
        lines.append("no completed trial yet")
    elif preference.is_preferential(study):
        lines.append(favourite_line(study, best))
    elif len(study.directions) == 1:
        lines.append(f"best: trial {best.number}, value {best.value:.6g}")
    else:
        lines.append(f"Pareto front: trials {[t.number for t in rf.ranked(study)]}")
    return lines


def favourite_line(study: optuna.Study, best: optuna.trial.FrozenTrial) -> str:
    """A person's study: the favourite so far and the choices it rests on."""
    wins, losses, _ = preference.tally(study)[best.number]
    made = len(preference.preferences(preference.system_attrs(study)))
    return (f"favourite: trial {best.number} ({wins} win(s), chosen worst {losses} time(s); "
            f"{made} stored choice pair(s))")
