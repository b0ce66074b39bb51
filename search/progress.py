"""One line per trial: COMPLETE trials against the target, this trial, the best trial, an ETA.

    [######..................] 5/20 complete | trial 6: score 0.7123 (1.4 s) | best: trial 4,
    score 0.7456, input=0.55 middle=0.72 out=0.60 | 9 s elapsed, ETA 27 s

(one line in the terminal). Each line ends with a newline: nothing is ever printed over it,
and an error message that follows starts on a line of its own.
"""

from __future__ import annotations

import math
import sys
import time

import optuna

from . import preference
from . import run_folder as rf
from .least_squares import ATTR_STEP
from .tables import favourite_line
from .trial import ATTR_CHEAP, ATTR_CHEAP_BAR, ATTR_DUPLICATE

_SHOWN_PARAMS = 8


REFRESH_SECONDS = 5.0


class Progress:
    """A callback ``(study, trial)`` for ``search.worker.optimize`` printing the line above.

    The ETA is the remaining COMPLETE trials times this worker's own pace so far (every trial
    it ran, failed and skipped ones included, over the time since its first trial started).
    The COMPLETE count and the best trial are read from the storage at most every
    ``REFRESH_SECONDS`` (a read costs ~10 ms on SQLite, in the thread that draws) and brought
    up to date with this worker's own trials in between; other workers' trials show at the
    next read. Several objectives and a person's studies are read every time.
    """

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.first_start: float | None = None
        self.seen = 0
        # a study is preferential from its creation or never: read once (it is a study system
        # attribute, and reading those reads every trial's dashboard note)
        self.preferential: bool | None = None
        self.done = 0
        self.best: optuna.trial.FrozenTrial | None = None
        self.read_at = -math.inf

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        now = time.time()
        if self.first_start is None:
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            self.first_start = min(started, now)
        self.seen += 1
        if self.preferential is None:
            self.preferential = preference.is_preferential(study)
        person = self.preferential
        done, best = self._count(study, trial, person)
        filled = int(self.width * min(done, self.total) / max(self.total, 1))
        parts = [f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} complete",
                 f"trial {trial.number}: {_outcome(trial, person)}"]
        if best is not None and person:
            parts.append(favourite_line(study, best))
        elif best is not None and len(study.directions) == 1:
            parts.append(f"best: trial {best.number}, score {_fmt(best.values)}, "
                         f"{_params(best.params)}")
        elif best is not None:
            parts.append(f"Pareto front: {len(rf.ranked(study))} trial(s)")
        elapsed = now - self.first_start
        remaining = max(self.total - done, 0)
        eta = _duration(elapsed / self.seen * remaining) if remaining else "done"
        parts.append(f"{_duration(elapsed)} elapsed, ETA {eta}")
        print(" | ".join(parts), file=self.stream, flush=True)


    def _count(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, person: bool
               ) -> tuple[int, optuna.trial.FrozenTrial | None]:
        """COMPLETE trials and the best one (see the class docstring)."""
        now = time.monotonic()
        if person or len(study.directions) > 1 or now - self.read_at >= REFRESH_SECONDS:
            complete = (optuna.trial.TrialState.COMPLETE,)
            self.done = len(study.get_trials(deepcopy=False, states=complete))
            self.best = rf.best_trial(study, person)
            self.read_at = now
        elif trial.state == optuna.trial.TrialState.COMPLETE:
            self.done += 1
            sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
            if self.best is None or (sign * trial.value, -trial.number) > (
                    sign * self.best.value, -self.best.number):
                self.best = trial
        return self.done, self.best


def _outcome(trial: optuna.trial.FrozenTrial, person: bool = False) -> str:
    seconds = ""
    timings = trial.user_attrs.get(rf.ATTR_TIMINGS)
    if isinstance(timings, dict) and timings:
        # the trial's own work: its start time is when it was asked for, and a trial proposed
        # ahead is asked for while the one before it draws
        seconds = f" ({sum(timings.values()):.1f} s)"
    elif trial.datetime_start and trial.datetime_complete:
        seconds = f" ({(trial.datetime_complete - trial.datetime_start).total_seconds():.1f} s)"
    if trial.state == optuna.trial.TrialState.FAIL:
        return f"FAILED{seconds}: {trial.user_attrs.get(rf.ATTR_FAIL) or 'no reason recorded'}"
    if trial.state == optuna.trial.TrialState.PRUNED and ATTR_CHEAP in trial.user_attrs:
        return (f"pruned{seconds}: cheap probes scored {trial.user_attrs[ATTR_CHEAP]:.6g}, "
                f"below the bar {trial.user_attrs.get(ATTR_CHEAP_BAR, float('nan')):.6g}")
    if trial.state == optuna.trial.TrialState.PRUNED:
        return (f"skipped, same parameters as trial {trial.user_attrs.get(ATTR_DUPLICATE)} "
                "(not evaluated again)")
    if person:
        score = trial.user_attrs.get(rf.ATTR_SCORE)
        return f"candidate drawn{seconds}" + (f", score {score:.6g}" if isinstance(
            score, (int, float)) else "")
    return f"score {_fmt(trial.values)}{seconds}{_step(trial)}"


def _step(trial: optuna.trial.FrozenTrial) -> str:
    """What the ``lsq`` sampler made of the trial, if it chose it (a step or a probe)."""
    record = trial.system_attrs.get(ATTR_STEP)
    if not isinstance(record, dict):
        return ""
    kind = "probe" if record.get("probe") else f"step of {record.get('radius', 0):.3g}"
    return f" [lsq {kind} from trial {record.get('from')}]"


def _params(params: dict[str, float]) -> str:
    shown = " ".join(f"{k}={v:.2f}" for k, v in list(params.items())[:_SHOWN_PARAMS])
    return shown + (" …" if len(params) > _SHOWN_PARAMS else "")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _fmt(values) -> str:
    if not values:
        return "-"
    return "/".join(f"{v:.6g}" for v in values)
