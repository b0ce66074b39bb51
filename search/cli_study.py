"""`mergesearch run | validate | status | best | dashboard | demo`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from .cli_options import (
    DASHBOARD_HOST,
    DASHBOARD_PORT,
    DEMO_TRIALS,
    PREFERENCE_CANDIDATES,
    PREFERENCE_TRIALS,
    check_count,
    check_port,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run (or resume) the study a config describes")
    p.add_argument("config", type=Path, help="the study config (YAML)")
    p.add_argument("--trials", type=int,
                   help="COMPLETE trials to reach; failed and interrupted ones do not count "
                        "(default: the config's trials)")
    p.add_argument("--timeout", type=float,
                   help="seconds this worker may run (default: the config's timeout, or none)")
    p.add_argument("--host", default=DASHBOARD_HOST,
                   help="preference / mixed studies: the dashboard's address")
    p.add_argument("--port", type=int, default=DASHBOARD_PORT,
                   help="preference / mixed studies: the dashboard's port (0: any free port)")
    p.add_argument("--no-dashboard", action="store_true",
                   help="preference / mixed studies: do not serve the dashboard here (another "
                        "`mergesearch dashboard RUN` does)")
    p.set_defaults(func=run_study_cmd)

    p = sub.add_parser("validate", help="check a study config and print it resolved")
    p.add_argument("config", type=Path, help="the study config (YAML)")
    p.set_defaults(func=validate_cmd)

    p = sub.add_parser("status", help="trial counts, running and stale trials, the best trial")
    p.add_argument("run", type=Path, help="a run folder (output/NAME)")
    p.add_argument("--fail-stale", action="store_true",
                   help="mark RUNNING trials whose worker stopped (killed, no heartbeat within "
                        "grace_seconds) FAIL")
    p.set_defaults(func=status_cmd)

    p = sub.add_parser("best", help="a table of the best trials of a run")
    p.add_argument("run", type=Path, help="a run folder (output/NAME)")
    p.add_argument("--top", type=int, default=5, help="how many trials to list")
    p.set_defaults(func=best_cmd)

    p = sub.add_parser("dashboard", help="optuna-dashboard on 127.0.0.1 with the run's images")
    p.add_argument("run", type=Path, help="a run folder (output/NAME)")
    p.add_argument("--host", default=DASHBOARD_HOST, help="address to listen on")
    p.add_argument("--port", type=int, default=DASHBOARD_PORT,
                   help="port to listen on (0: any free port)")
    p.set_defaults(func=dashboard_cmd)

    p = sub.add_parser("demo", help="find a hidden merge of the built-in tiny models")
    p.add_argument("--folder", type=Path, default=Path("demo_run"),
                   help="where the tiny models and the run go")
    p.add_argument("--trials", type=int, default=None,
                   help=f"COMPLETE trials to reach (default: {DEMO_TRIALS})")
    p.add_argument("--fresh", action="store_true", help="start over (delete the folder first)")
    p.add_argument("--preference", action="store_true",
                   help="instead, a preference study of the same models: you choose among the "
                        "candidates in the dashboard (FOLDER/preference.yaml; trials default "
                        f"{PREFERENCE_TRIALS})")
    p.add_argument("--candidates", type=int, default=None,
                   help=f"--preference: candidates shown at once (default: {PREFERENCE_CANDIDATES})")
    p.add_argument("--host", default=None,
                   help=f"--preference: the dashboard's address (default: {DASHBOARD_HOST})")
    p.add_argument("--port", type=int, default=None,
                   help="--preference: the dashboard's port, 0 for any free port (default: "
                        f"{DASHBOARD_PORT})")
    p.set_defaults(func=demo_cmd)


def quiet_optuna() -> None:
    """Optuna's own INFO lines ("A new study created", "Trial N finished") would double ours."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_study_cmd(args: argparse.Namespace) -> int:
    from .config import PERSON, load_config
    from .dashboard import DashboardServer
    from .progress import Progress
    from .study import optimize, prepare

    check_count("--trials", args.trials)
    if args.timeout is not None and not args.timeout > 0:
        raise ValueError(f"--timeout {args.timeout:g}: give the seconds this worker may run, "
                         "more than 0")
    quiet_optuna()
    cfg = load_config(args.config)
    # a person's study is chosen in the dashboard: its port is taken before the long work
    server = DashboardServer(args.host, args.port) \
        if cfg.objective in PERSON and not args.no_dashboard else None
    try:
        study, ctx = prepare(cfg)
        if server is not None:
            server.start(ctx.run)
            print(f"choose among the candidates at {server.study_url(study)}", file=sys.stderr,
                  flush=True)
        target = args.trials if args.trials is not None else cfg.trials
        result = optimize(study, ctx, trials=target, timeout=args.timeout,
                          callbacks=[Progress(target)])
        if server is not None and not result.interrupted and not result.all_failed:
            _serve_until_ctrl_c(server, study, result.completed)
        return report_run(study, result, cfg.run_folder)
    finally:
        if server is not None:
            server.stop()


def _serve_until_ctrl_c(server, study, completed: int) -> None:
    """Every candidate is drawn; the page stays up for the person's last choices."""
    print(f"all {completed} candidates are drawn; the dashboard stays open at "
          f"{server.study_url(study)} for your last choices: Ctrl-C when you are done "
          "(`--trials` higher and the same command draws more)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


def report_run(study, result, run_folder: Path) -> int:
    """The end of `run`: the study's status, what to do next, and the exit status (130 after
    Ctrl-C, 1 when this run's trials all failed or too many failed in a row)."""
    from .run_folder import ranked
    from .tables import status_lines

    for line in status_lines(study):
        print(line)
    complete = f"{result.completed} of {result.target} trials are complete"
    first = result.failures[0] if result.failures else None
    first_text = f"trial {first[0]}: {first[1] or 'no reason recorded'}" if first else ""
    if result.interrupted:
        print(f"interrupted: {complete} and stored; run the same command to resume",
              file=sys.stderr)
        return 130
    status = 0
    if result.all_failed:
        print(f"error: every trial of this run failed ({len(result.failures)}); the first, "
              f"{first_text}", file=sys.stderr)
        status = 1
    elif result.stopped:
        print(f"stopped: {result.stopped}; {complete}"
              + (f"; the first failure, {first_text}" if "failed" in result.stopped else "")
              + "; run the same command to go on", file=sys.stderr)
        status = 1 if "failed" in result.stopped else 0
    run = shlex.quote(str(run_folder))
    best = [t.number for t in ranked(study)[:3]]
    print("next:")
    if best:  # with no COMPLETE trial there is nothing to rank, compare or export
        print(f"  mergesearch best {run} --top 5")
    print(f"  mergesearch dashboard {run}      # http://127.0.0.1:8080")
    if best:
        print(f"  mergesearch compare {run} --trials {','.join(map(str, best))}")
        print(f"  mergesearch export {run} --best --to checkpoint --to comfyui")
    return status


def validate_cmd(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .study import check_config, resolve_device

    cfg = load_config(args.config)
    space = check_config(cfg)
    try:
        resolve_device(cfg)
    except ConfigError as exc:  # the config may be meant for another machine
        print(f"note: {exc} (on this machine)", file=sys.stderr)
    resolved = json.loads(cfg.model_dump_json())
    resolved["searched_parameters"] = {p.name: [p.low, p.high] for p in space.all_params()}
    print(yaml.safe_dump(resolved, sort_keys=False))
    return 0


def status_cmd(args: argparse.Namespace) -> int:
    from .liveness import fail_stale_trials
    from .run_folder import RunError, RunFolder, sqlite_file
    from .tables import status_lines

    run = RunFolder.load(args.run)
    study = run.study()
    if args.fail_stale:
        try:
            failed = fail_stale_trials(study)
        except RunError as exc:
            raise RunError(f"{sqlite_file(run.storage) or run.storage}: {exc}") from None
        print(f"marked FAIL: {', '.join(f'trial {n}' for n in failed)}" if failed else
              "no stale trial: every RUNNING trial has a live worker")
    for line in status_lines(study):
        print(line)
    return 0


def best_cmd(args: argparse.Namespace) -> int:
    from .run_folder import RunFolder
    from .tables import best_table

    check_count("--top", args.top)
    table = best_table(RunFolder.load(args.run).study(), args.top)
    with pd.option_context("display.max_columns", 60, "display.width", 200):
        print(table.to_string(index=False) if not table.empty else "no completed trial yet")
    return 0


def dashboard_cmd(args: argparse.Namespace) -> int:
    from .dashboard import DashboardServer
    from .preference import is_preferential
    from .run_folder import RunFolder

    run = RunFolder.load(args.run)
    study = run.study()
    server = DashboardServer(args.host, args.port)
    try:
        server.start(run)
        what = "choose among the candidates" if is_preferential(study) else "the study"
        print(f"optuna-dashboard for {run.path}: {what} at {server.study_url(study)} "
              "(Ctrl-C stops)", file=sys.stderr, flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def demo_cmd(args: argparse.Namespace) -> int:
    from .demo import run_demo

    check_count("--trials", args.trials)
    given = [f"--{k}" for k in ("candidates", "host", "port") if getattr(args, k) is not None]
    if given and not args.preference:
        raise ValueError(f"{', '.join(given)}: only a --preference demo has candidates and a "
                         "dashboard of its own; add --preference, or leave them out")
    quiet_optuna()
    if args.preference:
        from .demo import write_preference_config

        if args.candidates is None:
            args.candidates = PREFERENCE_CANDIDATES
        args.host = args.host or DASHBOARD_HOST
        args.port = DASHBOARD_PORT if args.port is None else args.port
        if args.candidates < 2:  # before the models and FOLDER/preference.yaml are written
            raise ValueError(f"--candidates {args.candidates}: a person picks the worst of two "
                             "or more candidates; give 2 or more")
        check_port(args.port)

        config = write_preference_config(args.folder, args.trials if args.trials is not None
                                         else PREFERENCE_TRIALS, args.candidates)
        print(f"wrote {config}; running it (the same as `mergesearch run {config}`)",
              file=sys.stderr, flush=True)
        return run_study_cmd(argparse.Namespace(config=config, trials=None, timeout=None,
                                                host=args.host, port=args.port,
                                                no_dashboard=False))
    result = run_demo(args.folder, trials=args.trials if args.trials is not None
                      else DEMO_TRIALS, fresh=args.fresh)
    return 130 if result.get("interrupted") else 0
