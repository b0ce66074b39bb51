"""A one-line-per-trial progress bar: trials done, this score, the best so far and its ratios."""

from __future__ import annotations

import sys
import time

import optuna

from . import run_folder as rf


class Progress:
    """An Optuna callback printing `[n/N] trial k: score s | best b (trial j): IN00=.. ...`."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 24):
        self.total = total
        self.stream = stream
        self.width = width
        self.start = time.perf_counter()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        done = len(study.get_trials(deepcopy=False, states=states))
        filled = int(self.width * min(done, self.total) / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        if trial.state == optuna.trial.TrialState.FAIL:
            this = f"FAILED ({trial.user_attrs.get(rf.ATTR_FAIL, 'see log')})"
        else:
            this = f"score {_fmt(trial.values)}"
        line = f"[{bar}] {done}/{self.total} trial {trial.number}: {this}"
        best = _best(study)
        if best is not None:
            ratios = " ".join(f"{k}={v:.2f}" for k, v in list(best.params.items())[:8])
            more = " …" if len(best.params) > 8 else ""
            line += f" | best {_fmt(best.values)} (trial {best.number}) {ratios}{more}"
        elapsed = time.perf_counter() - self.start
        print(f"{line} [{elapsed:.0f}s]", file=self.stream, flush=True)


def _best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial if len(study.directions) == 1 else None
    except ValueError:
        return None


def _fmt(values) -> str:
    if not values:
        return "-"
    return "/".join(f"{v:.6g}" for v in values)
