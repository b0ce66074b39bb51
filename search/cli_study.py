"""`mergesearch run | validate | status | best | dashboard | demo`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run (or resume) the study a config describes")
    p.add_argument("config", type=Path)
    p.add_argument("--trials", type=int, help="finished trials to reach (default: config)")
    p.add_argument("--timeout", type=float, help="seconds this worker may run")
    p.set_defaults(func=run_study_cmd)

    p = sub.add_parser("validate", help="check a study config and print it resolved")
    p.add_argument("config", type=Path)
    p.set_defaults(func=validate_cmd)

    p = sub.add_parser("status", help="trial counts and the best trial of a run")
    p.add_argument("run", type=Path)
    p.set_defaults(func=status_cmd)

    p = sub.add_parser("best", help="a table of the best trials of a run")
    p.add_argument("run", type=Path)
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(func=best_cmd)

    p = sub.add_parser("dashboard", help="optuna-dashboard on 127.0.0.1 with the run's images")
    p.add_argument("run", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=dashboard_cmd)

    p = sub.add_parser("demo", help="find a hidden merge of the built-in tiny models")
    p.add_argument("--folder", type=Path, default=Path("demo_run"))
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="start over (delete the folder first)")
    p.set_defaults(func=demo_cmd)


def run_study_cmd(args: argparse.Namespace) -> int:
    from .config import load_config
    from .progress import Progress
    from .study import optimize, prepare
    from .tables import status_lines

    cfg = load_config(args.config)
    study, ctx = prepare(cfg)
    optimize(study, ctx, trials=args.trials, timeout=args.timeout,
             callbacks=[Progress(args.trials or cfg.trials)])
    for line in status_lines(study):
        print(line)
    print(f"review: mergesearch best {cfg.run_folder} | mergesearch dashboard {cfg.run_folder}")
    return 0


def validate_cmd(args: argparse.Namespace) -> int:
    from .config import load_config
    from .study import check_config

    cfg = load_config(args.config)
    space = check_config(cfg)
    resolved = json.loads(cfg.model_dump_json())
    resolved["searched_parameters"] = {p.name: [p.low, p.high] for p in space.all_params()}
    print(yaml.safe_dump(resolved, sort_keys=False))
    return 0


def status_cmd(args: argparse.Namespace) -> int:
    from .run_folder import RunFolder
    from .tables import status_lines

    for line in status_lines(RunFolder.load(args.run).study()):
        print(line)
    return 0


def best_cmd(args: argparse.Namespace) -> int:
    from .run_folder import RunFolder
    from .tables import best_table

    table = best_table(RunFolder.load(args.run).study(), args.top)
    with pd.option_context("display.max_columns", 60, "display.width", 200):
        print(table.to_string(index=False) if not table.empty else "no completed trial yet")
    return 0


def dashboard_cmd(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from .run_folder import RunFolder

    run = RunFolder.load(args.run)
    print(f"optuna-dashboard for {run.path} at http://{args.host}:{args.port}/dashboard "
          "(Ctrl-C stops)", file=sys.stderr, flush=True)
    run_server(run.storage, host=args.host, port=args.port, artifact_store=run.artifact_store())
    return 0


def demo_cmd(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_TRIALS, run_demo

    run_demo(args.folder, trials=args.trials or DEFAULT_TRIALS, fresh=args.fresh)
    return 0
