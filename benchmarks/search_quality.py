"""Benchmark (issue 15): does the search find the merge? Samplers side by side in the toy world.

**Hidden merges.** In the trained toy world (``toyworld``), a secret ratio for each of the 26
SD1 MBW blocks of style_a x style_b (uniform in [0.1, 0.9], one draw per secret seed) draws
reference probes; a study exactly like the demo's (`reference` scorer, paired; the demo's four
training prompts, one seed, the world's sampling; warm starts model1, model2, uniform 0.5; all
26 blocks free, BASE as the text-encoder ratio) searches for it with each sampler. For each
sampler and budget (50, 150, 450 COMPLETE trials) it reports, median over the secrets, for the
best trial so far: the ratio RMSE over all blocks, over the sensitive blocks (the
sensitivity table at that secret, ``toyworld.figures.identifiability``: moving the block by
+-0.3 changes the score by >= 1% of its range both ways) and over the sensitive directions
(the same rule for moves along the eigenvectors of the scorer's Gauss-Newton matrix,
``toyworld.figures.Directions``: blocks that change the pictures alike cannot be told apart,
whatever the search), the score gap to the hidden merge, the first trial whose best-so-far
RMSE is below 0.10 (all blocks; sensitive directions), and the wall time split into
generation (apply, generate, score) and search overhead (everything else); its RMSE as a
ratio of random search's at the same budget; and how many trials it takes to score as well
as random search's best of its whole run.

**House style.** No secret: maximise the world's house-style scorer (`laion_aesthetic` with
the house head) over all 26 blocks, 150 trials of the default sampler against 1000 random
trials; the best merge, both parents and the uniform 0.5 merge are then scored on the held-out
prompts (two seeds). Margins are shares of the score range the random trials saw.

``default`` is the sampler a study gets when its config names none: ``lsq`` for the hidden
merges (their only objective scorer is the paired reference, which gives residuals), ``cmaes``
for the house style (``search.config.DEFAULT_SAMPLERS``, ``RESIDUAL_DEFAULT``).

Jobs (one study each) run in ``--jobs`` processes of one torch thread each. The default
sampler and random search run to 450 trials, the other samplers to 150 (``--long`` names the
samplers run to 450). ``--secrets`` sets how many (3 by default; never fewer goals).

    .venv/bin/python benchmarks/search_quality.py [--world DIR] [--secrets 3] [--jobs 2]
        [--samplers default,tpe,cmaes,gp,qmc,random] [--no-house]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import pickle
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks/toyworld.py must not shadow the toyworld package: the project first, this folder last
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] \
    + [str(HERE)]
from _fullsize import goal, machine  # noqa: E402

BUDGETS = (50, 150, 450)
DEFAULT = "default"
THRESHOLD = 0.10
HOUSE_TRIALS, HOUSE_RANDOM = 150, 1000
SECRET0 = 100


# ---------------------------------------------------------------------------- one study


def _world(folder: str | None):
    from toyworld.files import SHIPPED, ToyWorld

    return ToyWorld(Path(folder) if folder else SHIPPED)


def _probes(world, prompts: list[str], seeds: list[int]) -> dict:
    from toyworld.files import world_sampling

    return {"prompts": prompts, "seeds": seeds, **world_sampling(world.folder),
            "batch_size": len(prompts)}


def study_data(world, folder: Path, name: str, sampler: dict, trials: int, scorer: dict,
               warm: bool = True) -> dict:
    """A study of style_a x style_b over all 26 MBW blocks, as the demo's."""
    from toyworld.world import probe_prompts

    return {
        "name": name,
        "models": {"model1": str(world.style_a), "model2": str(world.style_b)},
        "config_folder": str(world.config_folder),
        "merge": {"method": "weighted_sum", "vocabulary": "mbw", "arithmetic": "fast",
                  "text_encoder": {"mode": "merge", "ratio": {"low": 0.0, "high": 1.0}}},
        "probes": _probes(world, probe_prompts(), [1]),
        "scorers": [scorer],
        "sampler": sampler,
        "warm_start": {"model1": warm, "model2": warm, "uniform": [0.5] if warm else []},
        "trials": trials, "output": str(folder), "device": "cpu", "dtype": "fp32",
    }


# strategies beside the samplers: "SAMPLER+STRATEGY" runs the sampler with these config parts
STRATEGIES = {
    "screen": {"screening": {}},  # after 2 x 26 + 10 = 62 trials, threshold 0.1
    "fidelity": {"fidelity": {"steps": 2, "keep": 0.5}},  # cheap probes at 2 of 4 steps
    "curves": {"warm_start": {"model1": True, "model2": True, "uniform": [0.5], "curves": 16}},
}


def sampler_config(name: str, seed: int) -> dict:
    """``sampler:`` for ``name`` (``default``: none named, so the study's config chooses)."""
    name = name.split("+")[0]
    return {"seed": seed} if name == DEFAULT else {"name": name, "seed": seed}


def strategy_config(name: str) -> dict:
    """The config parts of ``name``'s strategies (``tpe+screen+fidelity``)."""
    parts: dict = {}
    for strategy in name.split("+")[1:]:
        parts.update(STRATEGIES[strategy])
    return parts


@dataclass
class Job:
    task: str  # "hidden", "house" or "table" (the secret's sensitivity and directions)
    sampler: str
    secret: int
    seed: int
    trials: int
    world: str | None


@dataclass
class Outcome:
    job: Job
    values: list[float] = field(default_factory=list)  # per COMPLETE trial, in order
    ratios: list[dict[str, float]] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)  # apply + generate + score, s
    wall: list[float] = field(default_factory=list)  # end of trial - end of the one before
    hidden: dict[str, float] = field(default_factory=dict)
    hidden_score: float = math.nan
    held_out: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    candidates: int = 0  # COMPLETE + PRUNED (fidelity's pruned candidates cost no budget)


def run_job(job: Job) -> Outcome | SecretTable:
    if job.task == "table":
        return secret_table(job)
    import optuna
    import torch

    torch.set_num_threads(1)
    from evaluators import combine, generate, score_images
    from search import run_folder as rf
    from search.config import parse_config
    from search.study import optimize, prepare

    world = _world(job.world)
    started = time.perf_counter()
    scorer = {"kind": "clip", "model": str(world.clip_config),
              "weights": str(world.clip_weights)}
    if job.task == "hidden":
        scorer = {**scorer, "kind": "reference", "name": "reference", "mode": "paired",
                  "range": [0.5, 1.0]}
    else:
        scorer = {**scorer, "kind": "laion_aesthetic", "name": "house",
                  "head": str(world.house_head), "range": [0.0, 1.0]}
    out = Outcome(job)
    with tempfile.TemporaryDirectory() as tmp:
        data = study_data(world, Path(tmp), f"{job.task}-{job.sampler.replace('+', '_')}-{job.secret}",
                          sampler_config(job.sampler, job.seed), job.trials, scorer,
                          warm=job.task == "hidden" or job.sampler != "random")
        data.update(strategy_config(job.sampler))
        study, ctx = prepare(parse_config(data), log=lambda m: None)
        if job.task == "hidden":
            from toyworld.figures import hidden_ratios

            out.hidden = hidden_ratios(job.secret, 0.1, 0.9)
            ctx.engine.apply(ctx.space.block_recipe(out.hidden))
            reference = generate(ctx.pipe, ctx.probes)
            ctx.scorers[0].set_references(reference.images)
            out.hidden_score = combine(score_images(reference, ctx.scorers), ctx.norms)
        ends: dict[int, float] = {}
        first = time.perf_counter()
        optimize(study, ctx, log=lambda m: None,
                 callbacks=[lambda s, t: ends.__setitem__(t.number, time.perf_counter())])
        previous, busy = first, 0.0
        for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
            laps = trial.user_attrs.get(rf.ATTR_TIMINGS, {})
            # generation: apply, cheap probes (fidelity), full probes, scoring; a pruned
            # trial's counts towards the next COMPLETE one, whose wall time spans it
            busy += sum(laps.get(k, 0.0) for k in ("apply", "cheap", "generate", "score"))
            if trial.state != optuna.trial.TrialState.COMPLETE:
                continue
            out.values.append(float(trial.value))
            out.ratios.append(dict(ctx.space.recipe(trial.params).ratios))
            out.busy.append(busy)
            out.wall.append(ends.get(trial.number, previous) - previous)
            previous, busy = ends.get(trial.number, previous), 0.0
        out.candidates = len([t for t in study.get_trials(deepcopy=False)
                              if t.state in (optuna.trial.TrialState.COMPLETE,
                                             optuna.trial.TrialState.PRUNED)])
        if job.task == "house":
            out.held_out = _held_out(world, ctx, out)
    out.seconds = time.perf_counter() - started
    return out


def _held_out(world, ctx, out: Outcome) -> dict[str, float]:
    """House score on the held-out prompts: the best trial, both parents, the uniform merge."""
    from evaluators import generate
    from merge_backend.recipe import uniform_ratios
    from toyworld.figures import probe_set
    from toyworld.world import HELD_OUT, caption

    probes = probe_set(world, [caption(s) for s in HELD_OUT], [1, 2], batch_size=16)
    best = out.ratios[max(range(len(out.values)), key=out.values.__getitem__)]
    named = {"best": best, "style_a": uniform_ratios("sd1", "mbw", 1.0),
             "style_b": uniform_ratios("sd1", "mbw", 0.0),
             "uniform": uniform_ratios("sd1", "mbw", 0.5)}
    scores = {}
    for name, ratios in named.items():
        ctx.engine.apply(ctx.space.block_recipe(ratios))
        images = generate(ctx.pipe, probes)
        scores[name] = float(ctx.scorers[0].score(images.images, images.prompts).mean())
    return scores


# ---------------------------------------------------------------------------- figures


def rmse(found: dict[str, float], hidden: dict[str, float], blocks) -> float:
    return math.sqrt(sum((found[b] - hidden[b]) ** 2 for b in blocks) / len(blocks))


def best_so_far(out: Outcome, budget: int) -> int:
    values = out.values[:budget]
    return max(range(len(values)), key=values.__getitem__)  # the earlier among equals


def first_below(out: Outcome, error, threshold: float = THRESHOLD) -> int | None:
    """The first trial whose best-so-far ratios have ``error(ratios)`` below ``threshold``."""
    best = -math.inf
    for i, value in enumerate(out.values):
        if value > best:
            best = value
            if error(out.ratios[i]) < threshold:
                return i + 1
    return None


def first_reaching(out: Outcome, value: float) -> int | None:
    """The first trial scoring ``value`` or more."""
    return next((i + 1 for i, v in enumerate(out.values) if v >= value), None)


@dataclass
class SecretTable:
    """What the score can tell at one secret: its sensitive blocks (and the printed table)
    and its ``Directions``."""

    secret: int
    sensitive: list[str]
    lines: list[str]
    directions: object  # toyworld.figures.Directions

    def to_json(self) -> dict:
        return {"secret": self.secret, "sensitive": self.sensitive, "lines": self.lines,
                "directions": self.directions.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> SecretTable:
        from toyworld.figures import Directions

        return cls(data["secret"], data["sensitive"], data["lines"],
                   Directions.from_json(data["directions"]))


def secret_table(job: Job) -> SecretTable:
    import torch

    torch.set_num_threads(1)
    from toyworld import figures

    table, directions = figures.identifiability(_world(job.world),
                                                figures.hidden_ratios(job.secret, 0.1, 0.9))
    return SecretTable(job.secret, table.sensitive(), table.table(), directions)


def _cached_tables(path: str | None, secrets: list[int]) -> dict[int, SecretTable]:
    """The tables ``--sensitivity FILE`` holds (the same world and secret give the same
    table, and each costs a minute)."""
    import json

    if not path or not Path(path).exists():
        return {}
    data = json.loads(Path(path).read_text())
    return {int(k): SecretTable.from_json(v) for k, v in data.items() if int(k) in secrets}


def _save_tables(path: str | None, tables: dict[int, SecretTable]) -> None:
    import json

    if path:
        Path(path).write_text(json.dumps({str(k): t.to_json() for k, t in tables.items()}))


def _key(job: Job) -> tuple:
    """A job without its world folder (a temporary copy of the shipped world differs per run)."""
    return job.task, job.sampler, job.secret, job.seed, job.trials


def _saved(path: str | None, jobs: list[Job]) -> list[Outcome]:
    """The outcomes ``--save FILE`` holds for any of ``jobs`` (a run stopped part way resumes:
    those studies are not run again)."""
    if not path or not Path(path).exists():
        return []
    found = []
    with open(path, "rb") as saved:
        while True:
            try:
                out = pickle.load(saved)
            except EOFError:
                break
            if _key(out.job) in [_key(j) for j in jobs] and \
                    _key(out.job) not in [_key(o.job) for o in found]:
                found.append(out)
    if found:
        print(f"reusing {len(found)} finished studies from {path} "
              f"({sum(o.seconds for o in found) / 60:.1f} min of study time)")
    return found


def _median(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def hidden_report(outcomes: list[Outcome], tables: dict[int, SecretTable],
                  blocks: list[str]) -> dict:
    """Prints the hidden-merge table; returns {(sampler, budget): (rmse_all, rmse_sens,
    rmse_directions)}, each sampler's median trials to RMSE 0.10 (all blocks; sensitive
    directions), and its median trials to score as well as random search's best."""
    by_sampler: dict[str, list[Outcome]] = {}
    for out in outcomes:
        by_sampler.setdefault(out.job.sampler, []).append(out)
    table, reach, reach_dirs, match = {}, {}, {}, {}
    order = sorted(by_sampler, key=lambda s: s != "random")  # random first: the others' baseline
    by_sampler = {s: by_sampler[s] for s in order}
    random_best = {o.job.secret: (max(o.values), len(o.values))
                   for o in by_sampler.get("random", [])}
    counts = [(len(t.sensitive), len(t.directions.sensitive())) for t in tables.values()]
    print(f"\nhidden merges: {len(tables)} secrets; medians over secrets; sensitive blocks / "
          f"directions per secret: {', '.join(f'{b} / {d}' for b, d in counts)}")
    print(f"{'sampler':10s} {'budget':>6s} {'RMSE all':>9s} {'sens blk':>9s} {'sens dir':>9s} "
          f"{'gap %':>7s} {'vs random':>9s} {'<0.10 at':>9s} {'dir <0.10':>9s} {'gen s':>7s} "
          f"{'overhead s':>10s}")
    for sampler, outs in by_sampler.items():
        reached = [first_below(o, lambda r, o=o: rmse(r, o.hidden, blocks)) for o in outs]
        reach[sampler] = _median([r if r is not None else math.inf for r in reached])
        reached = [first_below(o, tables[o.job.secret].directions.rmse) for o in outs]
        reach_dirs[sampler] = _median([r if r is not None else math.inf for r in reached])
        if random_best:
            met = [first_reaching(o, random_best[o.job.secret][0]) for o in outs]
            match[sampler] = _median([m if m is not None else math.inf for m in met])
        for budget in BUDGETS:
            if any(len(o.values) < budget for o in outs):
                continue
            rows = []
            for o in outs:
                i = best_so_far(o, budget)
                t = tables[o.job.secret]
                rows.append((rmse(o.ratios[i], o.hidden, blocks),
                             rmse(o.ratios[i], o.hidden, t.sensitive),
                             t.directions.rmse(o.ratios[i]),
                             (o.hidden_score - o.values[i]) / abs(o.hidden_score) * 100,
                             sum(o.busy[:budget]), sum(o.wall[:budget]) - sum(o.busy[:budget])))
            med = [_median(col) for col in zip(*rows)]
            table[sampler, budget] = (med[0], med[1], med[2])
            rand = table.get(("random", budget))
            versus = f"{med[0] / rand[0]:9.2f}" if rand and sampler != "random" else f"{'-':>9s}"
            at, at_dirs = ("never" if math.isinf(r) else f"{r:.0f}"
                           for r in (reach[sampler], reach_dirs[sampler]))
            print(f"{sampler:10s} {budget:6d} {med[0]:9.4f} {med[1]:9.4f} {med[2]:9.4f} "
                  f"{med[3]:7.3f} {versus} {at:>9s} {at_dirs:>9s} {med[4]:7.1f} {med[5]:10.1f}")
    if random_best:
        ran = max(n for _, n in random_best.values())
        print(f"trials to score as well as random search's best of {ran} (median over secrets): "
              + ", ".join(f"{s} {'never' if math.isinf(m) else f'{m:.0f}'}"
                          for s, m in match.items()))
    return {"table": table, "reach": reach, "reach_dirs": reach_dirs, "match": match}


def house_report(outcomes: list[Outcome]) -> dict[str, float]:
    by = {o.job.sampler: o for o in outcomes}
    rand = by["random"]
    lo, hi = min(rand.values), max(rand.values)
    score_range = max(hi - lo, 1e-12)
    found = {}
    print(f"\nhouse style: random {len(rand.values)} trials, best {hi:.4f}, range {score_range:.4f}")
    for sampler, out in by.items():
        held = out.held_out
        rival = max(held[k] for k in ("style_a", "style_b", "uniform"))
        margin = (held["best"] - rival) / score_range
        n = len(out.values) if out is rand else min(len(out.values), HOUSE_TRIALS)
        share = max(out.values[:n]) / hi
        found[sampler] = (margin, share)
        print(f"  {sampler:8s} best of {n}: train {max(out.values[:n]):.4f} ({share:.1%} of "
              f"random-{len(rand.values)}'s best); "
              "held-out " + ", ".join(f"{k} {v:.4f}" for k, v in held.items())
              + f"; margin {margin:+.3f} of the range")
    return found


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", default=None, help="a world folder (default: the shipped)")
    parser.add_argument("--secrets", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="the samplers' seed")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--samplers", default="default,tpe,cmaes,gp,qmc,random")
    parser.add_argument("--long", default="default,random",
                        help="samplers run to 450 trials (the others to 150)")
    parser.add_argument("--no-house", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="plumbing only: 12 trials a study, no goals judged")
    parser.add_argument("--judge", default=None,
                        help="the sampler the GOAL lines judge (default: the default sampler)")
    parser.add_argument("--sensitivity", default=None,
                        help="cache each secret's sensitivity table and directions in this JSON file")
    parser.add_argument("--save", default=None,
                        help="append each finished study's outcome to this file (pickles); "
                             "studies already in it are not run again")
    args = parser.parse_args()
    from search.config import DEFAULT_SAMPLERS, RESIDUAL_DEFAULT

    default = RESIDUAL_DEFAULT  # the hidden merges' studies: one paired reference scorer
    samplers = [s for s in args.samplers.split(",") if s]
    if default in samplers and DEFAULT in samplers:  # the default named twice: run it once
        samplers.remove(default)
    long = set(args.long.split(","))
    print(f"machine: {machine()}; default sampler: {default} for the hidden merges, "
          f"{DEFAULT_SAMPLERS['weighted']} for the house style; {args.jobs} jobs x 1 thread")
    started = time.perf_counter()
    if args.world is None:  # the shipped world, written out with its config folder
        from toyworld.files import write_world

        keep = tempfile.TemporaryDirectory()
        args.world = str(write_world(Path(keep.name) / "world").folder)
    from toyworld.figures import MBW

    secrets = [SECRET0 + i for i in range(args.secrets)]
    tables = _cached_tables(args.sensitivity, secrets)
    cap = 12 if args.dry_run else 10**9
    # secrets 100, 101, ...: not the demo's (0); each secret's studies use their own seed
    jobs = [Job("hidden", s, SECRET0 + i, args.seed + i,
                min(cap, max(BUDGETS) if s in long else 150), args.world)
            for i in range(args.secrets) for s in samplers]
    if not args.no_house:
        jobs += [Job("house", "random", 0, args.seed, min(cap, HOUSE_RANDOM), args.world),
                 Job("house", DEFAULT, 0, args.seed, min(cap, HOUSE_TRIALS), args.world)]
    # the longest first, so the pool ends together; a secret's table costs about 60 trials
    jobs += [Job("table", "", s, 0, 60, args.world) for s in secrets if s not in tables]
    jobs.sort(key=lambda j: -j.trials)
    outcomes = _saved(args.save, jobs)
    reused = sum(o.seconds for o in outcomes) / max(args.jobs, 1)  # their share of the wall
    jobs = [j for j in jobs if _key(j) not in [_key(o.job) for o in outcomes]]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs) as pool:
        for out in pool.imap_unordered(run_job, jobs):
            if isinstance(out, SecretTable):
                tables[out.secret] = out
                _save_tables(args.sensitivity, tables)
                print(f"  done: table of secret {out.secret}", flush=True)
                continue
            outcomes.append(out)
            if args.save:
                with open(args.save, "ab") as saved:
                    pickle.dump(out, saved)
            print(f"  done: {out.job.task} {out.job.sampler} secret {out.job.secret}, "
                  f"{len(out.values)} trials ({out.candidates} drawn) in {out.seconds:.0f} s",
                  flush=True)
    for secret in secrets:
        t = tables[secret]
        print(f"\nsecret {secret}: sensitivity (reference score, +-0.3 per block; "
              f"{len(t.sensitive)} sensitive)")
        print("\n".join("  " + line for line in t.lines))
        print(f"secret {secret}: directions (+-0.3 along each; "
              f"{len(t.directions.sensitive())} sensitive)")
        print("\n".join("  " + line for line in t.directions.table()))
    hidden = [o for o in outcomes if o.job.task == "hidden"]
    report = hidden_report(hidden, tables, list(MBW))
    if args.dry_run:
        print(f"dry run: {len(outcomes)} studies in {(time.perf_counter() - started) / 60:.1f} "
              "min; no goals judged")
        if not args.no_house:
            house_report([o for o in outcomes if o.job.task == "house"])
        return
    minutes = (time.perf_counter() - started + reused) / 60
    if reused:
        print(f"benchmark minutes: this run plus the reused studies' time over {args.jobs} jobs "
              f"({reused / 60:.1f} min)")
    table, reach = report["table"], report["reach"]
    best_sampler = args.judge or (DEFAULT if DEFAULT in samplers else samplers[0])
    if hidden:  # --secrets 0: the house task alone
        goal("hidden_rmse_sensitive_at_150", table[best_sampler, 150][1], 0.05, fmt="{:.4f}")
        goal("hidden_rmse_all_at_150", table[best_sampler, 150][0], 0.10, fmt="{:.4f}")
        goal("hidden_rmse_sensitive_directions_at_150", table[best_sampler, 150][2], 0.05,
             fmt="{:.4f}")
        if "random" in reach:
            ratio = reach["random"] / reach[best_sampler]
            ran = max(len(o.values) for o in hidden if o.job.sampler == "random")
            if math.isinf(reach[best_sampler]):
                ratio = 0.0
                print(f"{best_sampler} never reached RMSE {THRESHOLD} (all blocks): ratio 0")
            elif math.isinf(reach["random"]):  # random never got there: a lower bound
                ratio = ran / reach[best_sampler]
                print(f"random search never reached RMSE {THRESHOLD} in {ran} trials: the ratio "
                      f"below is a lower bound ({ran} / {best_sampler}'s trials)")
            goal("trials_to_rmse_0.10_random_over_default", ratio, 3.0, higher_is_better=True,
                 fmt="{:.2f}")
            # the same question asked of the score: the trials random search took to find the
            # best of its whole run, over the trials the judged sampler took to score as well
            soon = report["match"][best_sampler]
            goal("trials_to_random_best_random_over_default",
                 0.0 if math.isinf(soon) else report["match"]["random"] / soon, 3.0,
                 higher_is_better=True, fmt="{:.2f}")
    if not args.no_house:
        house = house_report([o for o in outcomes if o.job.task == "house"])
        margin, share = house[DEFAULT]
        goal("house_margin_held_out", margin, 0.10, higher_is_better=True)
        goal("house_best_of_150_vs_random_1000", share, 0.95, higher_is_better=True)
    goal("benchmark_minutes", minutes, 25.0, fmt="{:.1f}")


if __name__ == "__main__":
    main()
