"""Automatic index choice (retrieval.ann.policy), the store's use of it, and filtered search
(retrieval.ann.search) that keeps its recall."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from retrieval.ann import policy
from retrieval.ann import search as ann_search
from retrieval.ann.exact import exact_topk
from retrieval.ann.policy import choose_index, estimated_bytes_per_vector
from retrieval.store import INDEX_FILE, Manifest, NewImage, Store, new_index

GIB = 2**30


def test_choice_follows_size_and_budget():
    small = choose_index(10_000, 1152, 8 * GIB)
    assert small.index_type == "Flat" and small.exact and "exact" in small.reason
    mid = choose_index(100_000, 1152, 8 * GIB)
    assert mid.index_type == "HNSW32,SQ8" and not mid.exact
    million = choose_index(1_000_000, 1152, 12 * GIB)  # the graph's recall drops here
    assert million.index_type == "IVF4096_HNSW32,SQ8" and million.bytes_per_vector <= 1536
    tight = choose_index(3_000_000, 1152, 2 * GIB)  # 8-bit graph (4.2 GB) does not fit
    assert tight.index_type.startswith("IVF") and ",PQ" in tight.index_type
    big = choose_index(8_000_000, 1152, 64 * GIB)
    assert big.index_type.startswith("IVF") and big.index_type.endswith("_HNSW32,SQ8")
    huge = choose_index(50_000_000, 1152, 64 * GIB)
    assert ",PQ" in huge.index_type and huge.rerank > 0
    assert policy.rerank_for(huge.index_type) == huge.rerank
    for choice in (small, mid, million, tight, big, huge):
        assert choice.reason
        faiss.index_factory(1152, choice.index_type, faiss.METRIC_INNER_PRODUCT)  # valid strings
        assert choice.to_json()["reason"]


def test_bytes_per_vector_estimates_match_faiss():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 64)).astype(np.float32)
    for spec in ("Flat", "HNSW16", "HNSW16,SQ8", "IVF16,SQ8"):
        index = new_index(spec, 64)
        index.train(x)
        index.add_with_ids(x, np.arange(len(x)))
        real = faiss.serialize_index(index).nbytes / len(x)
        assert abs(estimated_bytes_per_vector(spec, 64) - real) / real < 0.35, spec


def clustered(n, d, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


@pytest.mark.parametrize("spec", ["HNSW16", "IVF64,Flat", "Flat"])
@pytest.mark.parametrize("fraction", [0.01, 0.10])
def test_filtered_search_keeps_recall(spec, fraction, monkeypatch):
    monkeypatch.setattr(ann_search, "EXACT_SUBSET_LIMIT", 0)  # force the selector route
    x = clustered(8000, 32)
    q = clustered(30, 32, seed=1)
    ids = np.arange(100_000, 108_000, dtype=np.int64)
    index = new_index(spec, 32)
    index.train(x)
    index.add_with_ids(x, ids)
    allowed = np.sort(np.random.default_rng(2).choice(ids, int(len(ids) * fraction), replace=False))
    rows = np.searchsorted(ids, allowed)
    _, truth = exact_topk(q, x[rows], allowed, 10)
    _, found = ann_search.search_index(index, q, 10, allowed=allowed)
    assert np.isin(found[found >= 0], allowed).all()
    assert recall(found, truth) >= 0.95


def test_small_subsets_are_answered_exactly_and_lossy_codes_are_reranked():
    x = clustered(6000, 32)
    q = clustered(10, 32, seed=1)
    ids = np.arange(len(x), dtype=np.int64)
    index = new_index("IVF32,SQ4", 32)  # lossy like PQ, but trains in milliseconds
    index.train(x)
    index.add_with_ids(x, ids)
    fetch = lambda wanted: x[wanted]  # noqa: E731  (the store reads SQLite here)
    allowed = ids[::50]
    _, truth = exact_topk(q, x[allowed], allowed, 10)
    _, found = ann_search.search_index(index, q, 10, allowed=allowed, fetch_vectors=fetch)
    assert recall(found, truth) == 1.0
    _, truth = exact_topk(q, x, ids, 10)
    plain = recall(ann_search.search_index(index, q, 10)[1], truth)
    reranked = recall(ann_search.search_index(index, q, 10, fetch_vectors=fetch, rerank=4)[1], truth)
    assert reranked > plain


def indexed_with_offset_ids(spec, first_id, queries):
    """6,000 clustered vectors under ids first_id…, in an index of ``spec``, and queries."""
    x, q = clustered(6000, 32), clustered(queries, 32, seed=1)
    ids = np.arange(first_id, first_id + len(x), dtype=np.int64)
    index = new_index(spec, 32)
    index.train(x)
    index.add_with_ids(x, ids)
    return x, q, ids, index


@pytest.mark.parametrize("spec", ["HNSW16,SQ8", "IVF32_HNSW16,SQ8", "IVF32,PQ8"])
def test_small_subset_reads_few_raw_vectors_and_stays_exact(spec):
    x, q, ids, index = indexed_with_offset_ids(spec, 50_000, queries=10)
    asked = []

    def fetch(wanted):  # the store reads SQLite here: count what is read
        asked.append(len(wanted))
        return x[np.asarray(wanted) - 50_000]

    allowed = ids[::5]  # 1,200 rows: ranked on the index's own codes, then re-scored
    _, truth = exact_topk(q, x[allowed - 50_000], allowed, 10)
    scores, found = ann_search.search_index(index, q, 10, allowed=allowed, fetch_vectors=fetch)
    assert recall(found, truth) == 1.0
    assert max(asked) <= ann_search.SUBSET_RERANK * 10 < allowed.size
    exact_scores = (q[:, None, :] * x[found - 50_000]).sum(-1)
    assert np.allclose(scores, exact_scores, atol=1e-5)  # scores come from the raw vectors


@pytest.mark.parametrize("spec", ["HNSW16,SQ8", "HNSW16"])
def test_a_graph_scans_its_codes_for_a_selection_in_place(spec):
    _, q, ids, index = indexed_with_offset_ids(spec, 70_000, queries=4)
    allowed = ids[::3]
    scanned = ann_search._scan_graph_codes(index, q, allowed, 50)
    _, decoded = exact_topk(q, index.reconstruct_batch(allowed), allowed, 50)
    assert all(set(a) == set(b) for a, b in zip(scanned, decoded))  # same ranking, in place
    assert ann_search._scan_graph_codes(index, q, ids[:50], 50) is None  # under 1/64: decode


def test_an_ivf_index_saved_without_a_direct_map_gets_one_on_load(tmp_path):
    x = clustered(2000, 16)
    store = Store.create(tmp_path / "store", manifest("IVF16,SQ8"))
    add(store, x)
    store.save()
    store.close()
    path = str(tmp_path / "store" / INDEX_FILE)
    index = faiss.read_index(path)
    policy.inner_index(index).set_direct_map_type(faiss.DirectMap.NoMap)  # an older file
    faiss.write_index(index, path)
    with Store.open(tmp_path / "store", readonly=True) as reopened:
        ids, vectors = reopened.all_vectors()
        asked = []

        def fetch(wanted):
            asked.append(len(wanted))
            return reopened.vectors(wanted)

        allowed = ids[::4]
        _, truth = exact_topk(x[:3], vectors[::4], allowed, 10)
        _, found = ann_search.search_index(reopened.index, x[:3], 10, allowed=allowed, fetch_vectors=fetch)
        assert recall(found, truth) == 1.0
        assert max(asked) <= ann_search.SUBSET_RERANK * 10 < allowed.size


def manifest(index_type):
    return Manifest(model="m", model_revision="local", model_fingerprint="f", dim=16,
                    preprocessing_version="p", index_type=index_type)


def add(store, vectors, start=0):
    with store.writer() as writer:
        for i, v in enumerate(vectors):
            writer.add_file(path=f"/data/{start + i}.png", size=1, mtime_ns=1, content_hash=str(i),
                            source_kind="image", images=[NewImage(0, 1, 1, v)])


def test_store_auto_index_is_rechosen_as_it_grows(tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "EXACT_MAX_BYTES", 16 * 4 * 100)  # exact up to 100 vectors
    monkeypatch.setattr(policy, "SQ_MIN_TRAIN", 100)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((160, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = Store.create(tmp_path / "s", manifest("auto"))
    assert store.manifest.index_type == "Flat" and store.manifest.index_auto
    add(store, vectors[:50])
    store.maintain_index()
    store.save()
    assert store.manifest.index_type == "Flat"
    add(store, vectors[50:], start=50)
    store.maintain_index()
    store.close()
    reopened = Store.open(tmp_path / "s", readonly=True)
    assert reopened.manifest.index_type == "HNSW32,SQ8"
    assert reopened.index_status()["index_in_use"] == "HNSW32,SQ8"
    assert "auto:" in reopened.manifest.index_reason
    scores, ids = reopened.search(vectors[:3], 1)
    assert list(ids[:, 0]) == [1, 2, 3] and np.allclose(scores[:, 0], 1.0, atol=0.02)  # 8-bit codes
    reopened.close()
    pinned = Store.open(tmp_path / "s")
    pinned.rebuild("Flat")
    assert not pinned.manifest.index_auto and pinned.manifest.index_reason == "chosen by the user"
    pinned.close()


def test_a_chosen_ivf_waits_for_enough_vectors_and_retrains_as_the_store_grows(tmp_path):
    """IVF16 wants 16·39 = 624 training vectors and SQ8 1,000: below that the store is
    searched exactly instead of training (or failing to train) on the first batch."""
    x = clustered(4200, 16)
    store = Store.create(tmp_path / "s", manifest("IVF16,SQ8"))
    assert policy.training_minimum("IVF16,SQ8") == 1_000
    assert policy.training_minimum("IVF4096_HNSW32,PQ96x8") == 39 * 4096
    assert policy.training_minimum("RQ4x8") == 39 * 256
    assert policy.training_minimum("HNSW32") == 0 and not policy.needs_training("HNSW32", 16)
    add(store, x[:300])  # enough for k-means to run, too few to train 16 lists and SQ8 well
    store.maintain_index()
    store.save()
    status = store.index_status()
    assert status == {"index_in_use": "Flat", "index_trained_on": None, "index_waiting_for": 1_000}
    _, ids = store.search(x[:300], 1)
    assert (ids[:, 0] == np.arange(1, 301)).all()    # exact meanwhile
    add(store, x[300:1200], start=300)
    store.maintain_index()
    store.save()
    assert store.index_status() == {"index_in_use": "IVF16,SQ8", "index_trained_on": 1200,
                                     "index_waiting_for": None}
    add(store, x[1200:2000], start=1200)
    store.maintain_index()
    store.save()
    assert store.manifest.index_trained_on == 1200    # not yet twice as many
    add(store, x[2000:], start=2000)
    store.maintain_index()
    store.close()
    reopened = Store.open(tmp_path / "s", readonly=True)
    assert reopened.index_status()["index_trained_on"] == 4200  # retrained on the whole store
    assert isinstance(policy.inner_index(reopened.index), faiss.IndexIVF)
    assert reopened.count == 4200
    reopened.close()
    (tmp_path / "s" / INDEX_FILE).unlink()  # killed before the first save: rebuilt from SQLite
    with Store.open(tmp_path / "s") as rebuilt:
        assert rebuilt.index_status()["index_in_use"] == "IVF16,SQ8" and rebuilt.count == 4200
        policy.inner_index(rebuilt.index).nprobe = 16
        _, ids = rebuilt.search(x[:50], 1)
        assert (ids[:, 0] == np.arange(1, 51)).all()


def test_a_manifest_written_before_training_counts_were_kept_still_opens(tmp_path):
    store = Store.create(tmp_path / "s", manifest("IVF4,Flat"))
    add(store, clustered(400, 16))
    store.close()
    path = tmp_path / "s" / "manifest.json"
    doc = json.loads(path.read_text())
    del doc["index_trained_on"]
    path.write_text(json.dumps(doc))
    with Store.open(tmp_path / "s") as reopened:
        assert reopened.manifest.index_trained_on is None
        add(reopened, clustered(1000, 16, seed=4), start=400)
        reopened.maintain_index()                         # unknown: no surprise rebuild
        reopened.save()
        assert reopened.manifest.index_trained_on is None
        assert reopened.count == 1400


def test_saving_never_retrains_maintenance_is_an_explicit_step(tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "EXACT_MAX_BYTES", 16 * 4 * 100)  # exact up to 100 vectors
    monkeypatch.setattr(policy, "SQ_MIN_TRAIN", 100)
    x = clustered(160, 16)
    store = Store.create(tmp_path / "s", manifest("auto"))
    add(store, x)
    assert store.maintenance_due() == "rebuild"
    store.save()
    assert store.manifest.index_type == "Flat"            # save only persisted
    assert store.maintain_index()["action"] == "rebuilt"
    assert store.manifest.index_type == "HNSW32,SQ8" and store.maintenance_due() is None
    assert store.maintain_index()["action"] == "nothing"
    store.close()
    ivf = Store.create(tmp_path / "ivf", manifest("IVF4,Flat"))
    add(ivf, x[:100])
    assert ivf.index_status()["index_waiting_for"] == 156 and ivf.maintenance_due() is None
    add(ivf, clustered(100, 16, seed=2), start=100)
    assert ivf.maintenance_due() == "retrain"
    assert ivf.maintain_index()["action"] == "retrained"
    assert ivf.index_status()["index_in_use"] == "IVF4,Flat"
    ivf.close()
