"""A throwaway PostgreSQL server on 127.0.0.1 for tests (Debian's postgresql package)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def find_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl start in a temporary folder; ``url`` for SQLAlchemy / Optuna."""

    def __init__(self, folder: Path | None = None):
        # its own folder under the system temp dir: pytest's are private to root, and the
        # server runs as the postgres user
        self.folder = Path(folder or tempfile.mkdtemp(prefix="mergesearch-pg-"))
        self.port = _free_port()
        self.data = self.folder / "data"
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.prefix, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.prefix:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(find_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust")
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.folder / "log"),
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.folder}", "start")
        for _ in range(50):
            try:
                self._run(find_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                          "postgres", "mergesearch")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.2)
        return f"postgresql://postgres@127.0.0.1:{self.port}/mergesearch"

    def stop(self) -> None:
        subprocess.run([*self.prefix, find_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url():
    """A server for the session (per xdist worker); tests use their own study names."""
    if find_bin("initdb") is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql); .ci/run installs it")
    pytest.importorskip("psycopg")
    server = PostgresServer()
    yield server.start()
    server.stop()
