"""Several servers over one PostgreSQL store: each with its own folder (manifest and FAISS
index, a cache adopted from the database), all catching up on rows a third process writes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from retrieval.errors import StoreError
from retrieval.store import Store

from .conftest import write_images
from .serving import cli, make_app, running


def _count(client: httpx.Client) -> int:
    return client.get("/stats").json()["count"]


def test_two_servers_over_one_database_see_a_third_process_rows(postgres_server, tiny_model,
                                                                 tmp_path):
    url = postgres_server.create_database()
    write_images(tmp_path / "first", 3, seed=21)
    write_images(tmp_path / "second", 4, seed=22)
    cli("index", str(tmp_path / "first"), "--store", str(tmp_path / "writer"), "--db", url,
        "--model", str(tiny_model), "--workers", "0", "--no-progress")
    one, two = make_app(tmp_path / "server1", db=url), make_app(tmp_path / "server2", db=url)
    with running(one) as u1, running(two) as u2, \
            httpx.Client(base_url=u1, timeout=60) as c1, httpx.Client(base_url=u2, timeout=60) as c2:
        assert _count(c1) == _count(c2) == 3
        # a third process (its own interpreter, its own folder's lock) writes to the database
        done = subprocess.run(
            [sys.executable, "-m", "medsearch", "index", str(tmp_path / "second"), "--store",
             str(tmp_path / "writer"), "--model", str(tiny_model), "--workers", "0",
             "--batch-size", "2", "--no-progress", "--json"],
            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1])["indexed"] == 4
        for client in (c1, c2):
            assert _count(client) == 7  # caught up at this request: the counter moved
            found = client.post("/search", json={"query": "x", "k": 20}).json()["results"]
            assert {Path(r["path"]).parent.name for r in found} == {"first", "second"}
    # each server folder is a cache of the database's store, with its own manifest
    for folder in ("server1", "server2"):
        manifest = json.loads((tmp_path / folder / "manifest.json").read_text())
        assert manifest["database"] == url and manifest["index_sha256"] is None


def test_one_writer_per_database_whatever_the_folder(postgres_server, tmp_path):
    from .test_store import manifest

    url = postgres_server.create_database()
    first = Store.create(tmp_path / "a", manifest(), db=url, exclusive=True)
    try:
        with pytest.raises(StoreError, match="writer lock"):
            Store.open(tmp_path / "b", db=url, exclusive=True)  # adopts, then cannot write
        reader = Store.open(tmp_path / "b", readonly=True)  # readers never wait
        assert reader.url == url
        reader.close()
    finally:
        first.close()
    with pytest.raises(StoreError, match="already holds a store"):
        Store.create(tmp_path / "c", manifest(), db=url)
    second = Store.open(tmp_path / "b", exclusive=True)  # the lock went with the first writer
    assert second.holds_lock
    second.close()


def test_a_sqlite_store_refuses_a_database_url_and_a_bad_url_is_named(tmp_path):
    from .test_store import manifest

    Store.create(tmp_path / "s", manifest()).close()
    with pytest.raises(StoreError, match="SQLite in its folder") as err:
        Store.open(tmp_path / "s", db="postgresql+psycopg://u@127.0.0.1:1/x")
    assert err.value.setting == "db"
    with pytest.raises(StoreError, match="not a PostgreSQL URL"):
        Store.create(tmp_path / "t", manifest(), db="mysql://u@h/x")
