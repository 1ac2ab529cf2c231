"""Concurrency (issue 13, item 4): real `medsearch index` processes on one store are serialised
by the writer lock and never mix models; readers (the CLI's read-only open and the server)
see whole batches only, with index ids equal to row ids in every snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from retrieval.store import MANIFEST, Manifest, Store
from retrieval.store.vectors import index_ids as _index_ids
from tests.conftest import write_images
from tests.serving import make_app, running

REPO = Path(__file__).resolve().parents[2]
BATCH = 3


def index_proc(folder: Path, store: Path, model: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medsearch", "index", str(folder), "--store", str(store),
         "--model", str(model), "--workers", "0", "--no-progress", "--precision", "fp32",
         "--batch-size", str(BATCH), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def finish(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=600)
    assert "Traceback" not in err, err
    lines = out.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else None, err


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A second tiny SigLIP with other weights (another fingerprint)."""
    from retrieval.model.testmodel import make_test_model

    return make_test_model(tmp_path_factory.mktemp("model2") / "tiny-siglip-b", seed=1)


def embeddings(model: Path, paths: list[str]) -> np.ndarray:
    from indexer.pipeline import query_image_vector
    from retrieval.model import VisionEncoder, resolve_checkpoint

    encoder = VisionEncoder(resolve_checkpoint(str(model)), "cpu", "fp32")
    return np.stack([query_image_vector(encoder, p) for p in paths])


@pytest.mark.slow  # five CLI runs (~100 s on 2 busy cores); CI covers the lock with test_integrity's racers
def test_two_index_runs_are_serialised_and_never_mix_models(tmp_path, tiny_model, other_model):
    first, second = tmp_path / "first", tmp_path / "second"
    write_images(first, 8, seed=1)
    write_images(second, 8, seed=2)
    store = tmp_path / "store"
    # a new store, two models at once: one creates it, the other is refused (lock or model)
    procs = [index_proc(first, store, tiny_model), index_proc(first, store, other_model)]
    results = [finish(p) for p in procs]
    ok = [i for i, (code, _, _) in enumerate(results) if code == 0]
    assert ok, results
    for code, _, err in results:
        if code != 0:
            assert "another process is writing" in err or "cannot be mixed" in err, err
    winner = (tiny_model, other_model)[ok[0]]
    assert Manifest.read(store / MANIFEST).model == str(winner.resolve())
    # an existing store, two runs at once over different folders: serialised, then all done
    procs = [index_proc(first, store, winner), index_proc(second, store, winner)]
    for folder, (code, _, err) in zip((first, second), [finish(p) for p in procs]):
        if code != 0:
            assert "another process is writing" in err, err
            code, _, err = finish(index_proc(folder, store, winner))  # after the other one
            assert code == 0, err
    st = Store.open(store, readonly=True)
    report = st.check()
    assert report["ok"], report
    ids, vectors = st.all_vectors()
    rows = st.rows(ids.tolist())
    assert len(rows) == 16 and sorted(_index_ids(st.index).tolist()) == ids.tolist()
    expected = embeddings(winner, [rows[i]["path"] for i in ids.tolist()])
    cosines = np.sum(vectors * expected, axis=1)
    assert cosines.min() > 0.99, cosines  # every row holds the one model's vectors


def _snapshot_ok(st: Store, seen: list[int]) -> None:
    """Whole batches only, and the index holds exactly the ids of existing rows."""
    index_ids = sorted(_index_ids(st.index).tolist())
    assert st.count == len(index_ids)
    assert st.count % BATCH == 0 or st.count == 30, st.count
    rows = st.rows(index_ids)
    assert sorted(rows) == index_ids
    seen.append(st.count)


def test_readers_see_whole_batches_during_an_index_run(tmp_path, tiny_model):
    folder = tmp_path / "images"
    write_images(folder, 30, seed=4)
    store = tmp_path / "store"
    proc = index_proc(folder, store, tiny_model)
    cli_seen: list[int] = []
    server_seen: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not (store / MANIFEST).exists():  # the store appears whole or not at all
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        app = make_app(store)
        medsearch = app.state.medsearch
        with running(app) as base, httpx.Client(base_url=base, timeout=30) as client:
            while True:
                done = proc.poll() is not None
                st = Store.open(store, readonly=True)  # what `medsearch search` opens
                _snapshot_ok(st, cli_seen)
                st.engine.dispose()
                response = client.post("/search", json={"query": "a chest x-ray", "k": 50})
                assert response.status_code == 200, response.text
                stats = client.get("/stats").json()
                with medsearch.store_lock:
                    _snapshot_ok(medsearch.store, server_seen)
                    assert len(response.json()["results"]) <= medsearch.store.count
                assert stats["count"] % BATCH == 0 or stats["count"] == 30
                if done:
                    break
    finally:
        code, _, err = finish(proc)
    assert code == 0, err
    assert cli_seen[-1] == 30 and server_seen[-1] == 30
    print(json.dumps({"cli_snapshots": sorted(set(cli_seen)),
                      "server_snapshots": sorted(set(server_seen))}))
