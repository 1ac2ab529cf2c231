"""SIGKILL `medsearch index`, `reindex` and `tag` at random moments (10 kills, seeded) and
check after every kill that the store opens and agrees with itself, that no id is lost,
duplicated or reused, that every vector equals a fresh embedding of its file, and that the
finished store equals an uninterrupted build. The long run (≥ 50 kills) is
`python benchmarks/crash.py`; the harness and its checks live there."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kills_during_index_reindex_and_tag_leave_a_consistent_store(tmp_path, tiny_model,
                                                                     monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is a checkout folder, not installed
    from benchmarks.crash import crash_loop

    doc = crash_loop(tmp_path, tiny_model, index_kills=6, reindex_kills=2, tag_kills=2,
                     images=16, seed=13, new_rounds=False)
    assert doc["kills"] == 10, doc
    assert doc["findings"] == [], doc
    assert (doc["lost"], doc["duplicated"], doc["reused"], doc["inconsistent"]) == (0, 0, 0, 0)
    assert doc["invariant_checks_passed"] == doc["invariant_checks"] >= 12
    assert doc["images"] > doc["files"]  # multi-frame DICOM: several vectors for one file


KILL_AFTER_MANIFEST = """
import os, signal, sys
from retrieval import store as store_module
from retrieval.store import Store

real_write = store_module.Manifest.write

def write_then_die(self, path):
    real_write(self, path)
    if self.index_type == sys.argv[2]:  # not the writes an open makes (a repaired index's save)
        os.kill(os.getpid(), signal.SIGKILL)  # the manifest names the new type; the index is old

store_module.Manifest.write = write_then_die
st = Store.open(sys.argv[1])
st.rebuild(sys.argv[2])
st.save()
"""


def test_a_kill_between_the_manifest_and_the_index_save_is_recovered(tmp_path, tiny_model,
                                                                     monkeypatch):
    """Random kills rarely land in this window of a reindex, so it is hit on purpose: the
    process is SIGKILLed right after the manifest names the new index type, before the
    index file of that type is written. On open, the index in use must be the named type."""
    import subprocess
    import sys

    from indexer.pipeline import Indexer
    from retrieval.ann import inner_index
    from retrieval.model import VisionEncoder
    from retrieval.store import Store, manifest_for

    from ..conftest import write_images

    monkeypatch.syspath_prepend(str(ROOT))
    encoder = VisionEncoder.load(str(tiny_model), device="cpu", precision="fp32")
    write_images(tmp_path / "images", 6)
    st = Store.open_or_create(tmp_path / "store", manifest_for(encoder, "Flat"))
    with Indexer(st, encoder, workers=0, progress=False) as indexer:
        indexer.run([tmp_path / "images"])
    st.close()
    for target, kind in (("HNSW32", "IndexHNSWFlat"), ("Flat", "IndexFlat")):
        died = subprocess.run([sys.executable, "-c", KILL_AFTER_MANIFEST, str(tmp_path / "store"),
                               target], env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        assert died.returncode == -9
        st = Store.open(tmp_path / "store", readonly=True)
        assert st.manifest.index_type == target
        assert type(inner_index(st.index)).__name__.startswith(kind)
        assert st.count == 6
        ids, vectors = st.all_vectors()
        assert st.search(vectors, 1)[1][:, 0].tolist() == ids.tolist()
