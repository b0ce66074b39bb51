"""The `mergesearch` command: parse, call, print. Every sub-command lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

# The module that defines each command (its ``add_parsers(sub)``). Only the module a command
# line names is imported: `mergesearch merge` does not load optuna and pandas, which cost a
# third of a second at start and as much again at exit. --help and unknown commands load all.
COMMANDS = {
    "run": "cli_study", "validate": "cli_study", "status": "cli_study", "best": "cli_study",
    "dashboard": "cli_study", "demo": "cli_study", "merge": "cli_merge", "export": "cli_export",
    "lora": "cli_lora", "tiny": "cli_tiny", "toyworld": "cli_toyworld",
    "architectures": "cli_architectures", "compare": "cli_compare",
}


class Parser(argparse.ArgumentParser):
    """argparse's parser without abbreviated options: `merge layers --ratios X` was taken as
    ``--ratios-file X``, and an option added later could change what an abbreviation means.
    Sub-command parsers are made of the same class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for every command, or only for ``command`` when it is a known one."""
    parser = Parser(
        prog="mergesearch",
        description="Find good Stable Diffusion block merges automatically.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else dict.fromkeys(COMMANDS.values())
    for name in modules:
        importlib.import_module(f"{__package__}.{name}").add_parsers(sub)
    show_defaults(parser)
    return parser


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option of every command says its default in --help (or that it is required), so
    no command module has to remember to."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                show_defaults(child)
        elif action.option_strings and action.help is not argparse.SUPPRESS \
                and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            action.help = _with_default(action)


def _with_default(action: argparse.Action) -> str:
    text = action.help or ""
    if "default" in text.lower() or "required" in text.lower():
        return text
    if action.required:
        said = "required"
    elif isinstance(action, argparse._StoreTrueAction):
        said = "default: off"
    elif isinstance(action, argparse._StoreFalseAction):
        said = "default: on"
    elif action.default in (None, [], ()):
        said = "default: none"
    else:
        said = f"default: {str(action.default).replace('%', '%%')}"
    return f"{text} ({said})" if text else f"({said})"


def quiet_libraries() -> None:
    """Keep the terminal for our own progress: no per-load bars or experimental notices."""
    import warnings

    warnings.filterwarnings("ignore", message=".*experimental feature.*")
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    logging.getLogger("optuna").setLevel(logging.WARNING)  # our progress line says it all
    logging.getLogger("root").setLevel(logging.ERROR)
    # diffusers itself is quieted where pipelines are loaded (merge_backend.pipeline): importing
    # it here would cost every command, `merge` included, a second and a half.


class _LineTracker:
    """stderr, remembering whether the last write left a line open (a ``\r`` progress line):
    an error message then starts on a line of its own."""

    def __init__(self, stream):
        self._stream = stream
        self.open_line = False

    def write(self, text: str) -> int:
        if text:
            self.open_line = not text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt


def _sigterm_as_ctrl_c():
    """SIGTERM (``kill``, systemd, docker stop, a batch system's time limit) stops a command
    as Ctrl-C does: a study records its running trial ``interrupted``, a merge removes its
    partial file. Returns the handler to put back (None: left alone: not the main thread, or
    SIGTERM is already handled or ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _ctrl_c)


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no real stdout
        return False


def os_error_line(exc: OSError) -> str:
    """An OSError the system raised, as ``path: reason``, the path being the output a temporary
    name stood for (a full disk fails on ``.best.safetensors.<pid>-<start>@<host>.partial``);
    ours, which carry no file name, as they are."""
    from merge_backend.partial_files import output_of

    name = exc.filename2 if exc.filename2 is not None else exc.filename
    if name is None or not exc.strerror:
        return str(exc)
    return f"{output_of(os.fsdecode(name))}: {exc.strerror}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    stderr = sys.stderr
    sys.stderr = tracker = _LineTracker(stderr)

    def error(message: str) -> None:
        print(("\n" if tracker.open_line else "") + message, file=stderr, flush=True)

    terminate = _sigterm_as_ctrl_c()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        error("mergesearch: interrupted")
        return 130
    except BrokenPipeError as exc:
        if not _stdout_gone():  # another pipe broke: an error like any other
            error(f"mergesearch: error: {exc}")
            return 1
        # the reader of stdout went away (`mergesearch best RUN | head`): stop quietly, as
        # command-line tools do; stdout goes to /dev/null so the exit's flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except (ValueError, OSError) as exc:
        # Our errors are ValueError subclasses whose message names the file, key or field.
        if os.environ.get("MERGESEARCH_DEBUG"):
            raise
        error(f"mergesearch: error: {os_error_line(exc) if isinstance(exc, OSError) else exc}")
        return 1
    finally:
        sys.stderr = stderr
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


if __name__ == "__main__":
    sys.exit(main())
