"""Command-line options and checks that several commands share (kept light: a command's parser
is built without importing the heavy modules behind the others)."""

from __future__ import annotations

import argparse
from pathlib import Path

# where the dashboard listens unless told otherwise (`dashboard`, `run`, `demo --preference`)
DASHBOARD_HOST = "127.0.0.1"
DASHBOARD_PORT = 8080
# `demo`: COMPLETE trials of the scorer demo; of the preference demo, and its candidates shown
DEMO_TRIALS = 450
PREFERENCE_TRIALS = 30
PREFERENCE_CANDIDATES = 4


def output_path(value: str) -> Path:
    """An -o value: a path, never the empty string (which pathlib takes for '.', the working
    directory)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path; name the file or folder to write")
    return Path(value)


def check_config_folder(folder: Path, overwrite: bool) -> None:
    """``tiny`` and ``toyworld`` write their diffusers configs into FOLDER/config: files already
    there are replaced only with --overwrite, as their checkpoints are."""
    config = Path(folder) / "config"
    if config.exists() and not overwrite and (not config.is_dir() or any(config.iterdir())):
        raise ValueError(f"{config} exists, and the model configs would be written over it; "
                         "pass --overwrite to replace it, or choose another folder")


def check_port(port: int) -> None:
    """A TCP port a user typed for the dashboard (0: any free port)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a TCP port is 0-65535 (0 takes any free port)")


def check_count(flag: str, value: int | None, least: int = 1) -> None:
    """A count of trials a user typed (None: not given): below ``least`` it is refused, not
    ignored."""
    if value is not None and value < least:
        raise ValueError(f"{flag} {value}: give a number of trials, {least} or more")


def check_seed(flag: str, value: int) -> None:
    """A seed a user typed: 0 to 2**32 - 1, as a study config's ``sampler.seed`` (a larger one
    overflowed inside torch, after files were written)."""
    if not 0 <= value < 2**32:
        raise ValueError(f"{flag} {value}: give a seed from 0 to {2**32 - 1}")


def add_drawing_options(p: argparse.ArgumentParser, probes: str, loads: str, draws: str) -> None:
    """What compare and export draw with: --probes (``probes``: what they are for), the config
    folder the checkpoints load with (``loads``: which), --sources and --device (``draws``: what
    is drawn there)."""
    p.add_argument("--probes", type=Path, help=f"{probes} (default: the study's probe set)")
    p.add_argument("--config-folder", type=Path,
                   help=f"diffusers config folder to load {loads} with (default: the run's, "
                        "else built in)")
    add_sources_option(p)
    p.add_argument("--device", help=f"where {draws} (default: cuda if present, else cpu)")


def add_sources_option(p: argparse.ArgumentParser) -> None:
    """--sources DIR (compare and export): where moved source models are now."""
    p.add_argument("--sources", type=Path, action="append", default=[], metavar="DIR",
                   help="a folder holding source models (or LoRAs) that are no longer where the "
                        "run recorded them: found by file name, proved the same by their "
                        "sha256 (repeatable)")


def source_folders(args: argparse.Namespace) -> list[Path]:
    """--sources, each checked to be a folder."""
    for folder in args.sources:
        if not folder.is_dir():
            raise ValueError(f"--sources {folder}: not a folder")
    return list(args.sources)
