"""Indexing end to end on real files: incremental, resumable, and robust to bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.pipeline import Indexer
from retrieval.model import VisionEncoder
from retrieval.search import Searcher
from retrieval.store import Store

from .conftest import add_bad_files, write_images
from indexer.pipeline import query_image_vector
from retrieval.store import manifest_for


@pytest.fixture(scope="module")
def encoder(tiny_model) -> VisionEncoder:
    return VisionEncoder.load(str(tiny_model), device="cpu")


def run_index(store_dir: Path, encoder: VisionEncoder, *paths, workers: int = 0,
              db: str | None = None, **kw):
    """``db``: the PostgreSQL URL the store's rows go to (None: SQLite in the folder)."""
    store = Store.open_or_create(store_dir, manifest_for(encoder, "Flat"), db=db)
    with Indexer(store, encoder, workers=workers, progress=False, **kw) as indexer:
        report = indexer.run(paths)
    store.close()
    return report


def test_every_indexed_image_finds_itself_first(tmp_path, image_folder, encoder, backend):
    report = run_index(tmp_path / "store", encoder, image_folder, workers=2, db=backend)
    assert report.indexed == 11 and report.failed == 0 and report.total == 11
    store = Store.open(tmp_path / "store", readonly=True)
    assert store.count == 11
    searcher = Searcher(store)
    for path in sorted(image_folder.iterdir()):
        results = searcher.by_vector(query_image_vector(encoder, path), k=3)
        assert results[0].path == str(path.absolute())
        assert results[0].score >= 0.999


def test_dicom_metadata_is_stored_without_identifiers(tmp_path, image_folder, encoder):
    run_index(tmp_path / "store", encoder, image_folder)
    db = sqlite3.connect(tmp_path / "store" / "meta.sqlite")
    rows = db.execute("SELECT modality, study_date, patient_key FROM images "
                      "WHERE modality IS NOT NULL ORDER BY modality").fetchall()
    assert [r[0] for r in rows] == ["CT", "MR"]
    assert all(r[1] and len(r[1]) == 8 for r in rows)
    assert all(r[2] and len(r[2]) == 32 for r in rows)  # HMAC, not the PatientID itself
    dump = "\n".join(db.iterdump())
    assert "CompressedSamples^CT1" not in dump and "1CT1" not in dump  # PatientName / PatientID


def test_second_run_embeds_nothing_and_changes_are_followed(tmp_path, image_folder, encoder,
                                                            backend):
    store_dir = tmp_path / "store"
    first = run_index(store_dir, encoder, image_folder, db=backend)
    assert first.indexed == 11
    second = run_index(store_dir, encoder, image_folder)
    assert (second.indexed, second.unchanged, second.images) == (0, 11, 0)

    # same bytes, new mtime: no embedding; new content: re-embedded; deleted: removed
    touched = image_folder / "img000.png"
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
    write_images(tmp_path / "other", 5, seed=7)
    changed = image_folder / "img003.png"
    changed.write_bytes((tmp_path / "other" / "img003.png").read_bytes())
    (image_folder / "img006.png").unlink()
    third = run_index(store_dir, encoder, image_folder)
    assert (third.indexed, third.removed, third.unchanged) == (1, 1, 9)

    # a moved file keeps its vectors (found by content hash), nothing is re-embedded
    (image_folder / "img001.jpg").rename(image_folder / "moved.jpg")
    fourth = run_index(store_dir, encoder, image_folder)
    assert (fourth.indexed, fourth.renamed, fourth.removed) == (0, 1, 0)

    store = Store.open(store_dir, readonly=True)
    paths = {r["path"] for r in store.rows(list(range(1, 100))).values()}
    assert str((image_folder / "moved.jpg").absolute()) in paths
    assert str((image_folder / "img006.png").absolute()) not in paths
    assert store.count == store.stats()["images"] == 10


def test_bad_files_are_reported_and_the_rest_indexed(tmp_path, image_folder, encoder, backend):
    bad = add_bad_files(image_folder)
    report = run_index(tmp_path / "store", encoder, image_folder, workers=2, db=backend)
    assert report.indexed == 11
    assert report.failed == 3
    reasons = {Path(f["path"]).name: f["reason"] for f in report.failures}
    assert set(reasons) == {p.name for p in bad}
    assert "empty" in reasons["empty.png"]
    assert "not a readable image" in reasons["notes.jpg"]
    assert "truncated" in reasons["truncated.png"].lower()


def test_rows_index_and_vectors_agree_after_a_crash(tmp_path, image_folder, encoder):
    """A stale or missing FAISS file (killed before save) is reconciled from SQLite."""
    store_dir = tmp_path / "store"
    run_index(store_dir, encoder, image_folder)
    (store_dir / "index.faiss").unlink()
    store = Store.open(store_dir)
    assert store.count == 11
    store.close()
    (store_dir / "index.faiss").write_bytes(b"garbage")  # damaged file
    assert Store.open(store_dir).count == 11


INDEX_SCRIPT = """
import sys
from indexer.pipeline import Indexer
from retrieval.model import VisionEncoder
from retrieval.store import Store
from retrieval.store import manifest_for
enc = VisionEncoder.load(sys.argv[1], device="cpu")
store = Store.open_or_create(sys.argv[2], manifest_for(enc, "Flat"))
with Indexer(store, enc, workers=int(sys.argv[4]), batch_size=1, progress=False) as indexer:
    report = indexer.run([sys.argv[3]])
store.close()
print(report.indexed)
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_part_way_then_resume_has_no_duplicates(tmp_path, tiny_model, workers):
    folder = tmp_path / "many"
    write_images(folder, 24, seed=3)
    add_bad_files(folder)
    store_dir = tmp_path / "store"
    cmd = [sys.executable, "-c", INDEX_SCRIPT, str(tiny_model), str(store_dir), str(folder),
           str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own group: the kill takes the workers too
    db = store_dir / "meta.sqlite"
    deadline = time.time() + 120
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as con:
                    committed = con.execute("SELECT count(*) FROM images").fetchone()[0]
            except sqlite3.OperationalError:
                committed = 0
            if committed >= 5:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run at once, as a power cut or OOM kill would
    proc.wait()
    assert 5 <= committed < 24

    finish = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    assert 0 < int(finish.stdout.strip()) < 24  # resumed: only what was not committed

    store = Store.open(store_dir, readonly=True)
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT count(*) FROM images").fetchone()[0]
        paths = con.execute("SELECT count(*), count(DISTINCT path) FROM files").fetchone()
        vectors = con.execute("SELECT count(*) FROM vectors").fetchone()[0]
    assert rows == vectors == store.count == 24
    assert paths == (24, 24)
    ids, _ = store.all_vectors()
    assert len(np.unique(ids)) == 24
