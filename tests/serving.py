"""Helpers for the service tests: index a store through the CLI, run uvicorn on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import uvicorn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str) -> dict:
    """Run a medsearch command in-process (the real CLI path) and return its JSON document."""
    import io
    from contextlib import redirect_stdout

    from medsearch.cli import app

    out = io.StringIO()
    with redirect_stdout(out):
        app(args=[*args, "--json"], standalone_mode=False, prog_name="medsearch")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (as the console script does): exit code, stdout, stderr."""
    from medsearch.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def index_store(store: Path, folder: Path, model: Path, db: str | None = None) -> dict:
    return cli("index", str(folder), "--store", str(store), "--model", str(model),
               "--workers", "0", "--no-progress", *(("--db", db) if db else ()))


@contextmanager
def running(app, port: int | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yields the base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           server_header=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def make_app(store: Path, db: str | None = None, **kwargs):
    """The web app as `medsearch serve --store STORE [--db DB]` builds it."""
    from medsearch.app import Medsearch
    from medsearch.settings import Settings
    from medsearch.web import create_app

    # as `medsearch serve` does: redaction and keys follow the settings
    return create_app(Medsearch.from_settings(Settings.resolve(store=str(store), db=db)),
                      **kwargs)
