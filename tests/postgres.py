"""A real PostgreSQL server for the tests, on loopback, started once per test session.

PostgreSQL refuses to run as root, so under root the cluster is made and run as the
`postgres` user (runuser) in a temporary folder it owns. A test that needs the server skips
with the reason when it cannot start, unless MEDSEARCH_REQUIRE_POSTGRES=1 (set by `.ci/run`
when the binaries are installed), which turns the skip into a failure. Each test gets a fresh
database (CREATE DATABASE takes milliseconds), so tests never see each other's rows.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

#: The durability a test never needs: fsync off makes CREATE DATABASE and commits fast.
FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"


def bin_folder() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def required() -> bool:
    return os.environ.get("MEDSEARCH_REQUIRE_POSTGRES") == "1"


def unavailable(reason: str):
    """Skip (or, where the server is required, fail) with the reason."""
    if required():
        pytest.fail(f"PostgreSQL is required (MEDSEARCH_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(f"no PostgreSQL server for the tests: {reason}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One cluster in a temporary folder, listening on 127.0.0.1 only (trust auth: loopback)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="medsearch-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=self.folder)

    def start(self) -> None:
        if self.as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        for args in (("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8"),
                     ("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "log"), "-w",
                      "-o", f"-k {self.folder} -h 127.0.0.1 -p {self.port} {FAST}", "start")):
            done = self._run(*args)
            if done.returncode:
                log = (self.folder / "log").read_text() if (self.folder / "log").exists() else ""
                raise RuntimeError(f"{args[0]} failed: {(done.stderr or done.stdout).strip()} "
                                   f"{log[-500:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def start_server() -> tuple[PostgresServer | None, str]:
    """(a running server, "") or (None, why not)."""
    bin_dir = bin_folder()
    if bin_dir is None:
        return None, "the server binaries are not installed (/usr/lib/postgresql/*/bin)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return None, "running as root and runuser is missing (PostgreSQL refuses root)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "the psycopg package is not installed"
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except (OSError, RuntimeError, subprocess.TimeoutExpired, KeyError, LookupError) as exc:
        shutil.rmtree(server.folder, ignore_errors=True)
        return None, f"it would not start: {exc}"
    return server, ""
