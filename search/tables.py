"""Tables of a study for the terminal and notebooks (pandas)."""

from __future__ import annotations

import optuna
import pandas as pd

from . import run_folder as rf


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial: number, state, value(s), per-scorer scores, params, timings."""
    rows = []
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
        if t.user_attrs.get("warm_start"):
            row["warm_start"] = t.user_attrs["warm_start"]
        if t.state == optuna.trial.TrialState.FAIL:
            row["fail_reason"] = t.user_attrs.get(rf.ATTR_FAIL, "")
        rows.append(row)
    return pd.DataFrame(rows)


def best_table(study: optuna.Study, top: int = 5) -> pd.DataFrame:
    table = trials_table(study)
    if table.empty or "value" not in table:
        return table
    done = table[table["state"] == "COMPLETE"]
    return done.sort_values("value", ascending=False).head(top).reset_index(drop=True)


def status_lines(study: optuna.Study) -> list[str]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    lines = [f"study {study.study_name}: " + ", ".join(f"{n} {s.lower()}" for s, n in
                                                      sorted(counts.items())) or "no trials"]
    try:
        if len(study.directions) == 1:
            best = study.best_trial
            lines.append(f"best: trial {best.number}, value {best.value:.6g}")
        else:
            lines.append(f"Pareto front: trials {[t.number for t in study.best_trials]}")
    except ValueError:
        lines.append("no completed trial yet")
    return lines
