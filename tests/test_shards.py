"""A sharded index (`medsearch reindex --shards N`): the same answers as one index (exactly for
Flat, recall@10 within 0.005 either way for IVF shards sharing one trained quantiser), the store's writes,
filters and checks on it, the layout on disk and in the manifest, and kills mid-reindex."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval.ann import policy
from retrieval.ann.exact import exact_topk
from retrieval.filters import Filters
from retrieval.store import INDEX_FILE, Manifest, NewImage, Store

from .test_ann import clustered as clustered_vectors
from .test_ann import recall

ROOT = Path(__file__).resolve().parents[1]
DIM = 16


def clustered(n, d=DIM, seed=0):
    return clustered_vectors(n, d, seed)


def make_store(root, vectors, index_type="Flat"):
    store = Store.create(root, Manifest(model="m", model_revision="local", model_fingerprint="f",
                                        dim=DIM, preprocessing_version="p", index_type=index_type))
    add(store, vectors)
    return store


def add(store, vectors, start=0):
    with store.writer() as writer:
        for i, v in enumerate(vectors, start):
            writer.add_file(path=f"/data/{i}.png", size=1, mtime_ns=1, content_hash=str(i),
                            source_kind="image", images=[NewImage(0, 1, 1, v, metadata={
                                "modality": "CT" if i % 4 == 0 else "MR"})])


def shard_files(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith(INDEX_FILE)
                  and not p.name.endswith(".tmp"))


def test_flat_shards_answer_exactly_as_one_index_through_writes_filters_and_reopen(tmp_path):
    x, q = clustered(900), clustered(25, seed=1)
    store = make_store(tmp_path / "s", x)
    one = store.search(q, 10)
    ct_only = Filters(modality=["CT"])
    one_filtered = store.search(q, 10, ct_only)
    store.rebuild("Flat", 3)
    store.save()
    assert store.vector_index.layout() == {"index_shards": 3, "shard_sizes": [300, 300, 300]}
    assert shard_files(tmp_path / "s") == ["index.faiss.0", "index.faiss.1", "index.faiss.2"]
    assert store.manifest.index_shards == 3 and len(store.manifest.index_shard_files) == 3
    for before, after in ((one, store.search(q, 10)), (one_filtered, store.search(q, 10, ct_only))):
        assert (before[1] == after[1]).all()
        np.testing.assert_allclose(before[0], after[0], atol=1e-5)
    # new ids go to shard id % 3, removed ones leave theirs
    add(store, clustered(30, seed=2), start=900)
    with store.writer() as writer:
        writer.remove_files([f"/data/{i}.png" for i in range(0, 60)])
    for number, part in enumerate(policy.shard_list(store.index)):
        ids = faiss.vector_to_array(faiss.downcast_index(part).id_map)
        assert (ids % 3 == number).all()
    store.close()
    reopened = Store.open(tmp_path / "s")
    assert reopened.index_problem is None and reopened.check()["ok"], reopened.check()
    assert reopened.count == 870 and reopened.vector_index.shards == 3
    ids, vectors = reopened.all_vectors()
    _, truth = exact_topk(q, vectors, ids, 10)
    assert (reopened.search(q, 10)[1] == truth).all()
    # back to one index: one file, the shard files gone
    reopened.rebuild("Flat", 1)
    reopened.close()
    assert shard_files(tmp_path / "s") == ["index.faiss"]
    with Store.open(tmp_path / "s", readonly=True) as back:
        assert back.index_problem is None and back.manifest.index_shards == 1
        assert (back.search(q, 10)[1] == truth).all()


@pytest.mark.parametrize("spec", ["IVF16,Flat", "IVF16,SQ8", "IVF16,PQ4x4"])
def test_ivf_shards_sharing_one_quantiser_keep_recall(tmp_path, spec):
    x, q = clustered(2500), clustered(60, seed=3)
    store = make_store(tmp_path / "s", x, spec)
    store.maintain_index()
    ids, vectors = store.all_vectors()
    _, truth = exact_topk(q, vectors, ids, 10)
    one = recall(store.search(q, 10)[1], truth)
    store.rebuild(spec, 4)
    store.save()
    parts = policy.shard_list(store.index)
    assert len(parts) == 4 and store.index_status()["index_in_use"] == spec
    centroids = [policy.inner_index(p).quantizer.reconstruct_n(0, 16) for p in parts]
    assert all((c == centroids[0]).all() for c in centroids)  # ONE trained quantiser
    sharded = recall(store.search(q, 10)[1], truth)
    assert abs(sharded - one) <= 0.005, (spec, one, sharded)
    # a filter through the bitmap selector per shard, and the small-subset path
    allowed = store.matching_ids(Filters(modality=["CT"]))
    _, ftruth = exact_topk(q, vectors[np.isin(ids, allowed)], allowed, 10)
    found = store.search(q, 10, Filters(modality=["CT"]))[1]
    assert np.isin(found[found >= 0], allowed).all() and recall(found, ftruth) >= 0.9
    store.close()
    with Store.open(tmp_path / "s", readonly=True) as again:
        assert again.index_problem is None
        assert recall(again.search(q, 10)[1], truth) == sharded


def test_a_damaged_shard_is_reported_and_rebuilt(tmp_path):
    x = clustered(200)
    store = make_store(tmp_path / "s", x)
    store.rebuild("Flat", 2)
    store.close()
    shard = tmp_path / "s" / "index.faiss.1"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with Store.open(tmp_path / "s", readonly=True) as st:
        assert "index.faiss.1" in st.index_problem and st.count == 200
        problems = st.check()["problems"]
        assert any("index.faiss.1" in p and "checksum" in p for p in problems), problems
    with Store.open(tmp_path / "s") as st:  # a writable open saves the rebuilt shards
        assert st.vector_index.shards == 2
    with Store.open(tmp_path / "s") as st:
        assert st.index_problem is None and st.check()["ok"]


KILL = """
import os, signal, sys
from retrieval.store import Store, layout, shards as shard_files

moment, shards = sys.argv[2], int(sys.argv[3])
real_write, real_finish = layout.Manifest.write, layout.AtomicFile.finish
finished = []

def write_then_die(self, path):
    real_write(self, path)
    if moment == "after-manifest" and self.index_shards == shards:
        os.kill(os.getpid(), signal.SIGKILL)  # the manifest names the new files; none renamed

def finish_then_die(self, verify=False):
    real_finish(self, verify)
    finished.append(self.path)
    if moment == "mid-files" and len(finished) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # two shard files written, the manifest not yet

layout.Manifest.write = write_then_die
layout.AtomicFile.finish = finish_then_die
st = Store.open(sys.argv[1])
st.rebuild("Flat", shards)
st.save()
"""


@pytest.mark.parametrize("moment", ["mid-files", "after-manifest"])
def test_a_kill_mid_reindex_leaves_a_usable_store(tmp_path, moment):
    x, q = clustered(300), clustered(10, seed=1)
    store = make_store(tmp_path / "s", x)
    store.rebuild("Flat", 2)
    store.close()
    died = subprocess.run([sys.executable, "-c", KILL, str(tmp_path / "s"), moment, "3"],
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert died.returncode == -9
    with Store.open(tmp_path / "s", readonly=True) as st:
        if moment == "mid-files":  # the previous layout, used as it is
            assert st.index_problem is None and st.manifest.index_shards == 2
        else:  # the new layout, rebuilt from the stored vectors
            assert st.manifest.index_shards == 3 and st.vector_index.shards == 3
        ids, vectors = st.all_vectors()
        assert st.count == 300
        assert (st.search(q, 10)[1] == exact_topk(q, vectors, ids, 10)[1]).all()
    with Store.open(tmp_path / "s", exclusive=True):  # the writer's open clears dead temps
        pass
    with Store.open(tmp_path / "s") as st:
        assert st.index_problem is None and st.check()["ok"], st.check()
        assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]


def test_cli_reindex_shards_and_info_show_the_layout(tmp_path, capsys):
    from .test_cli import cli

    store = make_store(tmp_path / "s", clustered(120))
    store.close()
    code, doc, _ = cli(capsys, "reindex", "--shards", "4", "--store", str(tmp_path / "s"))
    assert (code, doc["index_type"], doc["index_shards"], doc["shard_sizes"]) == (
        0, "Flat", 4, [30, 30, 30, 30])
    code, doc, _ = cli(capsys, "info", "--store", str(tmp_path / "s"))
    assert (code, doc["count"], doc["index_shards"], doc["shard_sizes"]) == (0, 120, 4, [30] * 4)
    code, doc, _ = cli(capsys, "reindex", "--shards", "1", "--index-type", "HNSW16",
                       "--store", str(tmp_path / "s"))
    assert (code, doc["index_type"], doc["index_shards"], doc["shard_sizes"]) == (
        0, "HNSW16", 1, [120])
    assert shard_files(tmp_path / "s") == ["index.faiss"]
