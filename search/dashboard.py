"""optuna-dashboard for a run folder, served from a thread on 127.0.0.1 (or another host).

`mergesearch dashboard RUN` serves it until Ctrl-C; `mergesearch run` serves it beside the
worker for a preference or mixed study, where a person chooses among the candidates. The port
is taken first, before any long work, so a busy port is a one-line error; port 0 takes any free
port (the URL says which).

Example:
    >>> server = DashboardServer("127.0.0.1", 0)        # doctest: +SKIP
    >>> server.start(RunFolder.load("runs/demo"))        # doctest: +SKIP
    >>> server.study_url(study)                          # doctest: +SKIP
    'http://127.0.0.1:40123/dashboard/studies/1'
"""

from __future__ import annotations

import errno
import re
import socket
import socketserver
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from . import run_folder as rf
from .cli_options import DASHBOARD_HOST, DASHBOARD_PORT, check_port
from .run_folder import RunFolder
from .trial import note_in_folder


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request would bury the progress lines


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class DashboardServer:
    """A port held from construction; ``start`` serves a run's study on it from a thread."""

    def __init__(self, host: str = DASHBOARD_HOST, port: int = DASHBOARD_PORT):
        check_port(port)
        try:
            self._server = make_server(host, port, _not_ready, server_class=_ThreadingServer,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
                raise OSError(f"--host {host}: not an address of this machine ({reason}); give "
                              "one of its addresses or names (127.0.0.1: this machine only, "
                              "0.0.0.0: every network)") from None
            raise OSError(f"--port {port}: cannot listen on {host}:{port} ({reason}); pick "
                          "another --port (0 takes any free port)") from None
        self.host = host
        self.port = self._server.server_port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/dashboard"

    def study_url(self, study: optuna.Study) -> str:
        return f"{self.url}/studies/{study._study_id}"

    def start(self, run: RunFolder) -> None:
        import warnings

        from optuna_dashboard import wsgi

        # the page's importance plot warns on few trials; the terminal is for progress lines
        warnings.filterwarnings("ignore", message=".*select the same set of trials.*")
        storage = notes_naming(rf.open_storage(run.storage, run.heartbeat_seconds,
                                               run.grace_seconds), run.path)
        self._server.set_app(_json_for_no_content(wsgi(storage,
                                                        artifact_store=run.artifact_store())))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="mergesearch-dashboard")
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()


def notes_naming(storage, folder: Path):
    """``storage``, whose reads of a study's notes give their commands naming ``folder`` (the
    run folder as it is now: the notes of a copied or moved run name the folder their trials
    ran in). Nothing is written: a read-only copy shows the same."""
    from optuna_dashboard._note import split_body

    read, read_all = storage.get_study_system_attrs, storage.get_all_studies
    note = re.compile(r"^dashboard:(?:(\d+):)?note_str:(\d+)$")

    def in_folder(stored: dict) -> dict:
        attrs = dict(stored)
        parts: dict[str | None, list[tuple[int, str]]] = {}
        for key in list(attrs):
            found = note.match(key)
            if found:
                parts.setdefault(found[1], []).append((int(found[2]), attrs.pop(key)))
        for trial_id, pieces in parts.items():
            body = note_in_folder("".join(text for _, text in sorted(pieces)), folder)
            attrs.update(split_body(body, None if trial_id is None else int(trial_id)))
        return attrs

    def get_all_studies() -> list:
        studies = read_all()
        for study in studies:
            study.system_attrs = in_folder(study.system_attrs)
        return studies

    # the dashboard reads a study's notes through both
    storage.get_study_system_attrs = lambda study_id: in_folder(read(study_id))
    storage.get_all_studies = get_all_studies
    return storage


def _not_ready(environ, start_response):
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"the study is still loading; reload in a moment\n"]


# optuna-dashboard 0.21 answers a choice ("Worst"), a skip and an undo with 204 and no body; its
# page then fails to parse the empty body and shows "Failed to report preference" although the
# choice was stored. These answers get the JSON body "{}" with status 200 instead.
_CHOICE_ROUTES = re.compile(r"^/api/studies/\d+/(preference(/[^/]+)?|\d+/skip)$")


def _json_for_no_content(app):
    def wrapped(environ, start_response):
        if not _CHOICE_ROUTES.match(environ.get("PATH_INFO", "")):
            return app(environ, start_response)
        seen: dict = {}

        def capture(status, headers, exc_info=None):
            seen.update(status=status, headers=headers, exc_info=exc_info)
            return lambda data: None  # nothing writes through it: bottle returns its body

        body = b"".join(app(environ, capture))
        status, headers = seen["status"], seen["headers"]
        if status.startswith("204"):
            status, body = "200 OK", b"{}"
            headers = [(k, v) for k, v in headers if k.lower() not in ("content-length",
                                                                       "content-type")]
            headers += [("Content-Type", "application/json"), ("Content-Length", "2")]
        start_response(status, headers, seen["exc_info"])
        return [body]
    return wrapped
