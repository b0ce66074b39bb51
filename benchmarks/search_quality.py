"""Benchmark (issue 15): does the search find the merge? Samplers side by side in the toy world.

**Hidden merges.** In the trained toy world (``toyworld``), a secret ratio for each of the 26
SD1 MBW blocks of style_a x style_b (uniform in [0.1, 0.9], one draw per secret seed) draws
reference probes; a study exactly like the demo's (`reference` scorer, paired; the demo's four
training prompts, one seed, the world's sampling; warm starts model1, model2, uniform 0.5; all
26 blocks free, BASE as the text-encoder ratio) searches for it with each sampler. For each
sampler and budget (50, 150, 450 COMPLETE trials) it reports, median over the secrets, for the
best trial so far: the ratio RMSE over all blocks and over the sensitive blocks (the world's
sensitivity table, ``toyworld.figures.sensitivity``: moving the block by +-0.3 changes the
score by >= 1% of its range both ways), the score gap to the hidden merge, the first trial
whose best-so-far RMSE is below 0.10, and the wall time split into generation (apply,
generate, score) and search overhead (everything else); and its RMSE as a ratio of random
search's at the same budget.

**House style.** No secret: maximise the world's house-style scorer (`laion_aesthetic` with
the house head) over all 26 blocks, 150 trials of the default sampler against 1000 random
trials; the best merge, both parents and the uniform 0.5 merge are then scored on the held-out
prompts (two seeds). Margins are shares of the score range the random trials saw.

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
    from search.config import SamplerConfig

    name = name.split("+")[0]
    return {"name": SamplerConfig().name if name == DEFAULT else name, "seed": seed}


def strategy_config(name: str) -> dict:
    """The config parts of ``name``'s strategies (``tpe+screen+fidelity``)."""
    parts: dict = {}
    for strategy in name.split("+")[1:]:
        parts.update(STRATEGIES[strategy])
    return parts


@dataclass
class Job:
    task: str  # "hidden" or "house"
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


def run_job(job: Job) -> Outcome:
    import optuna
    import torch

    torch.set_num_threads(1)
    from evaluators import combine, generate, score_images
    from search import run_folder as rf
    from search.config import parse_config
    from search.space import TEXT_ENCODER
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
            te = ctx.space.te_block
            ctx.engine.apply(ctx.space.recipe(ctx.space.params_for(
                {**out.hidden, TEXT_ENCODER: out.hidden[te]})))
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
    te = ctx.space.te_block
    for name, ratios in named.items():
        from search.space import TEXT_ENCODER

        ctx.engine.apply(ctx.space.recipe(ctx.space.params_for(
            {**ratios, TEXT_ENCODER: ratios[te]})))
        images = generate(ctx.pipe, probes)
        scores[name] = float(ctx.scorers[0].score(images.images, images.prompts).mean())
    return scores


# ---------------------------------------------------------------------------- figures


def rmse(found: dict[str, float], hidden: dict[str, float], blocks) -> float:
    return math.sqrt(sum((found[b] - hidden[b]) ** 2 for b in blocks) / len(blocks))


def best_so_far(out: Outcome, budget: int) -> int:
    values = out.values[:budget]
    return max(range(len(values)), key=values.__getitem__)  # the earlier among equals


def first_below(out: Outcome, blocks, threshold: float = THRESHOLD) -> int | None:
    best = -math.inf
    for i, value in enumerate(out.values):
        if value > best:
            best, ratios = value, out.ratios[i]
            if rmse(ratios, out.hidden, blocks) < threshold:
                return i + 1
    return None


def sensitive_blocks(world_folder: str | None) -> tuple[list[str], list[str]]:
    from toyworld import figures

    table = figures.sensitivity(_world(world_folder))
    return table.sensitive(), table.table()


def _cached_sensitivity(args) -> tuple[list[str], list[str]]:
    """The sensitivity table, or the one ``--sensitivity FILE`` holds (written the first time:
    the same world gives the same table, and it costs two minutes)."""
    import json

    path = Path(args.sensitivity) if args.sensitivity else None
    if path is not None and path.exists():
        data = json.loads(path.read_text())
        return data["sensitive"], data["lines"]
    sensitive, lines = sensitive_blocks(args.world)
    if path is not None:
        path.write_text(json.dumps({"sensitive": sensitive, "lines": lines}))
    return sensitive, lines


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


def hidden_report(outcomes: list[Outcome], sensitive: list[str], blocks: list[str]) -> dict:
    """Prints the hidden-merge table; returns {(sampler, budget): (rmse_all, rmse_sens)} and
    each sampler's median trials to RMSE 0.10."""
    by_sampler: dict[str, list[Outcome]] = {}
    for out in outcomes:
        by_sampler.setdefault(out.job.sampler, []).append(out)
    table, reach = {}, {}
    order = sorted(by_sampler, key=lambda s: s != "random")  # random first: the others' baseline
    by_sampler = {s: by_sampler[s] for s in order}
    print(f"\nhidden merges: {len(by_sampler.get('random', []))} secrets; medians over secrets; "
          f"{len(sensitive)} sensitive blocks")
    print(f"{'sampler':10s} {'budget':>6s} {'RMSE all':>9s} {'RMSE sens':>9s} {'gap %':>7s} "
          f"{'vs random':>9s} {'<0.10 at':>9s} {'gen s':>7s} {'overhead s':>10s}")
    for sampler, outs in by_sampler.items():
        reached = [first_below(o, blocks) for o in outs]
        reach[sampler] = _median([r if r is not None else math.inf for r in reached])
        for budget in BUDGETS:
            if any(len(o.values) < budget for o in outs):
                continue
            rows = []
            for o in outs:
                i = best_so_far(o, budget)
                rows.append((rmse(o.ratios[i], o.hidden, blocks),
                             rmse(o.ratios[i], o.hidden, sensitive),
                             (o.hidden_score - o.values[i]) / abs(o.hidden_score) * 100,
                             sum(o.busy[:budget]), sum(o.wall[:budget]) - sum(o.busy[:budget])))
            med = [_median(col) for col in zip(*rows)]
            table[sampler, budget] = (med[0], med[1])
            rand = table.get(("random", budget))
            versus = f"{med[0] / rand[0]:9.2f}" if rand and sampler != "random" else f"{'-':>9s}"
            at = "never" if math.isinf(reach[sampler]) else f"{reach[sampler]:.0f}"
            print(f"{sampler:10s} {budget:6d} {med[0]:9.4f} {med[1]:9.4f} {med[2]:7.3f} "
                  f"{versus} {at:>9s} {med[3]:7.1f} {med[4]:10.1f}")
    return {"table": table, "reach": reach}


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
                        help="cache the world's sensitivity table in this JSON file")
    parser.add_argument("--save", default=None,
                        help="append each finished study's outcome to this file (pickles); "
                             "studies already in it are not run again")
    args = parser.parse_args()
    from search.config import SamplerConfig

    default = SamplerConfig().name
    samplers = [s for s in args.samplers.split(",") if s]
    if default in samplers and DEFAULT in samplers:  # the default named twice: run it once
        samplers.remove(default)
    long = set(args.long.split(","))
    print(f"machine: {machine()}; default sampler: {default}; {args.jobs} jobs x 1 thread")
    started = time.perf_counter()
    if args.world is None:  # the shipped world, written out with its config folder
        from toyworld.files import write_world

        keep = tempfile.TemporaryDirectory()
        args.world = str(write_world(Path(keep.name) / "world").folder)
    sensitive, lines = _cached_sensitivity(args)
    print("sensitivity (reference score, +-0.3 per block):")
    print("\n".join("  " + line for line in lines))
    from toyworld.figures import MBW

    cap = 12 if args.dry_run else 10**9
    # secrets 100, 101, ...: not the demo's (0); each secret's studies use their own seed
    jobs = [Job("hidden", s, SECRET0 + i, args.seed + i,
                min(cap, max(BUDGETS) if s in long else 150), args.world)
            for i in range(args.secrets) for s in samplers]
    if not args.no_house:
        jobs += [Job("house", "random", 0, args.seed, min(cap, HOUSE_RANDOM), args.world),
                 Job("house", DEFAULT, 0, args.seed, min(cap, HOUSE_TRIALS), args.world)]
    jobs.sort(key=lambda j: -j.trials)  # the longest first: the pool ends together
    outcomes = _saved(args.save, jobs)
    reused = sum(o.seconds for o in outcomes) / max(args.jobs, 1)  # their share of the wall
    jobs = [j for j in jobs if _key(j) not in [_key(o.job) for o in outcomes]]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs) as pool:
        for out in pool.imap_unordered(run_job, jobs):
            outcomes.append(out)
            if args.save:
                with open(args.save, "ab") as saved:
                    pickle.dump(out, saved)
            print(f"  done: {out.job.task} {out.job.sampler} secret {out.job.secret}, "
                  f"{len(out.values)} trials ({out.candidates} drawn) in {out.seconds:.0f} s",
                  flush=True)
    hidden = [o for o in outcomes if o.job.task == "hidden"]
    report = hidden_report(hidden, sensitive, list(MBW))
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
    if not args.no_house:
        house = house_report([o for o in outcomes if o.job.task == "house"])
        margin, share = house[DEFAULT]
        goal("house_margin_held_out", margin, 0.10, higher_is_better=True)
        goal("house_best_of_150_vs_random_1000", share, 0.95, higher_is_better=True)
    goal("benchmark_minutes", minutes, 25.0, fmt="{:.1f}")


if __name__ == "__main__":
    main()
