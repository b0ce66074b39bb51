"""A person's choices in a study: optuna-dashboard's preferential optimisation.

In a ``preference`` study the dashboard's study page shows ``preference.candidates`` probe
grids and asks "Which trial is the worst?". A click stores the choice in the study (the
clicked trial is worse than each other candidate shown), and the preferential GP sampler
(``sampler: preferential_gp``) learns from every stored choice to propose the next candidate,
which the worker draws as soon as a place on the page is free. In a ``mixed`` study the scorers
shortlist: the worker draws ``preference.pool`` proposals per free place, keeps the one the
scorers rate best on the page and hides the others, recording "best ≻ each other" as the
scorers' choices, so the GP learns from both; the person decides among the shortlist. (Each
proposal shows on the page from the moment it is drawn until its round is judged: a finished
trial's attributes cannot change, so it carries its picture from the start.)

Every trial is COMPLETE with the value 0.0 (values mean nothing here; the scores, when there
are scorers, are in the ``scores`` attribute) and carries ``ATTR_CANDIDATE``, the artifact id of
the probe grid the page shows.

The study's choices live in its system attributes in optuna-dashboard's own format (written by
``optuna_dashboard.preferential``; read here without importing it, which would import botorch):
``preference:values<id>`` lists of (better, worse) trial numbers, ``preference:skip_trial:<trial
id>`` for trials hidden from the page, ``preference:n_generate`` the number of candidates shown.
``tests/test_preference.py`` checks this reading against optuna-dashboard's.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
from optuna.trial import TrialState

ATTR_CANDIDATE = "candidate_image"  # user attr: the probe grid a candidate shows on the page
_PREFERENTIAL = "preference:is_preferential"
_VALUES = "preference:values"
_SKIP = "preference:skip_trial:"


def system_attrs(study: optuna.Study) -> dict:
    return study._storage.get_study_system_attrs(study._study_id)


def is_preferential(study: optuna.Study) -> bool:
    return bool(system_attrs(study).get(_PREFERENTIAL))


def preferences(attrs: dict) -> list[tuple[int, int]]:
    """Every stored (better, worse) pair of trial numbers in a study's system ``attrs``, the
    person's and the scorers' (a choice undone in the dashboard is stored as an empty list)."""
    return [(int(b), int(w)) for key, pairs in attrs.items() if key.startswith(_VALUES)
            for b, w in pairs]


def skipped_ids(attrs: dict) -> set[int]:
    return {int(key[len(_SKIP):]) for key in attrs
            if key.startswith(_SKIP) and key[len(_SKIP):].isdigit()}


def create(cfg, storage, sampler) -> optuna.Study:
    """Make (or open) the preferential study and show each candidate's probe grid."""
    from optuna_dashboard import register_preference_feedback_component
    from optuna_dashboard.preferential import create_study

    study = create_study(n_generate=cfg.preference.candidates, storage=storage, sampler=sampler,
                         study_name=cfg.name, load_if_exists=True)
    register_preference_feedback_component(study, "artifact", ATTR_CANDIDATE)
    return optuna.load_study(study_name=cfg.name, storage=storage, sampler=sampler)


def active(study: optuna.Study) -> int:
    """Candidates on the page (shown, never chosen as worst, not skipped) plus trials running."""
    attrs = system_attrs(study)
    worse = {w for _, w in preferences(attrs)}
    skipped = skipped_ids(attrs)
    return sum(1 for t in study.get_trials(deepcopy=False,
                                           states=(TrialState.COMPLETE, TrialState.RUNNING))
               if t.number not in worse and t._trial_id not in skipped
               and (t.state == TrialState.RUNNING or ATTR_CANDIDATE in t.user_attrs))


def settle_shortlist(study: optuna.Study, trials: list[optuna.trial.FrozenTrial],
                     score: Callable[[optuna.trial.FrozenTrial], float]) -> int | None:
    """Mixed mode: keep the trial the scorers rate best (``score``; ties: the earlier) on the
    page, hide the others and record them as worse than it; returns the number kept."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        return None
    best = max(done, key=lambda t: (score(t), -t.number))
    rest = [t for t in done if t.number != best.number]
    for t in rest:
        study._storage.set_study_system_attr(study._study_id, f"{_SKIP}{t._trial_id}", True)
    if rest:
        study._storage.set_study_system_attr(study._study_id, f"{_VALUES}scorers-{best.number}",
                                             [(best.number, t.number) for t in rest])
    return best.number


def tally(study: optuna.Study) -> dict[int, tuple[int, int, bool]]:
    """(wins, losses, hidden) per COMPLETE trial number, over every stored choice."""
    attrs = system_attrs(study)
    skipped = skipped_ids(attrs)
    out = {t.number: [0, 0, t._trial_id in skipped]
           for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    for better, worse in preferences(attrs):
        if better in out:
            out[better][0] += 1
        if worse in out:
            out[worse][1] += 1
    return {n: (w, lost, hidden) for n, (w, lost, hidden) in out.items()}


def ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials, the person's favourite first: shown before hidden, then fewest times
    chosen as worst, then most wins, then the earlier trial."""
    counts = tally(study)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: (counts[t.number][2], counts[t.number][1],
                                       -counts[t.number][0], t.number))
