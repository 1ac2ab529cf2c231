"""The store on its own: filters inside the FAISS search, manifests, atomic saves."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval import ann
from retrieval.errors import StoreError
from retrieval.filters import Filters
from retrieval.store import Manifest, NewImage, Store

DIM = 16


def manifest(**kw) -> Manifest:
    base = dict(model="m", model_revision="local", model_fingerprint="abc", dim=DIM,
                preprocessing_version="v1")
    return Manifest(**{**base, **kw})


def unit(rng, n=1):
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture()
def store(tmp_path, backend):
    """200 images: modality alternates CT/MR/CR/US, dates across 2020-2023, labels on some;
    rows in SQLite and (``backend``) in PostgreSQL."""
    rng = np.random.default_rng(0)
    st = Store.create(tmp_path / "store", manifest(), db=backend)
    modalities = ["CT", "MR", "CR", "US"]
    with st.writer() as w:
        for i in range(200):
            meta = {"modality": modalities[i % 4], "body_part": "CHEST" if i % 5 == 0 else "HEAD",
                    "study_date": f"{2020 + i % 4}0{1 + i % 9}15"}
            labels = ["effusion"] if i % 10 == 0 else []
            w.add_file(path=f"/archive/{'derm' if i % 7 == 0 else 'rad'}/f{i}.png", size=1,
                       mtime_ns=1, content_hash=f"h{i}", source_kind="image",
                       images=[NewImage(0, 8, 8, unit(rng)[0], meta, labels)])
    yield st
    st.db.dispose()  # no connections left open on the server


def test_filters_return_only_matching_rows_and_k_when_k_exist(store):
    rng = np.random.default_rng(1)
    q = unit(rng)
    cases = [
        (Filters(modality=["CT"]), lambda r: r["metadata"]["modality"] == "CT", 50),
        (Filters(modality=["ct", "MR"]), lambda r: r["metadata"]["modality"] in ("CT", "MR"), 100),
        (Filters(body_part=["chest"]), lambda r: r["metadata"]["body_part"] == "CHEST", 40),
        (Filters(date_from="2021-01-01", date_to="2021-12-31"),
         lambda r: r["metadata"]["study_date"].startswith("2021"), 50),
        (Filters(path_glob="*/derm/*"), lambda r: "/derm/" in r["path"], 29),
        (Filters(label=["effusion"]), lambda r: any(l["label"] == "effusion" for l in r["metadata"]["labels"]), 20),
        (Filters(modality=["CT"], body_part=["CHEST"]),
         lambda r: r["metadata"]["modality"] == "CT" and r["metadata"]["body_part"] == "CHEST", 10),
    ]
    everything = store.rows(store.all_vectors()[0].tolist())
    for filters, ok, n_matching in cases:
        expected = sorted(i for i, row in everything.items() if ok(row))
        assert len(expected) == n_matching, filters
        assert store.matching_ids(filters).tolist() == expected, filters  # exact set, sorted
        for k in (5, n_matching, n_matching + 7):
            scores, ids = store.search(q, k, filters)
            got = [int(i) for i in ids[0] if i >= 0]
            assert len(got) == min(k, n_matching), (filters, k)
            rows = store.rows(got)
            assert all(ok(rows[i]) for i in got), filters
            assert np.all(np.diff(scores[0][: len(got)]) <= 1e-6)  # best first


def test_filtered_search_is_exact_within_the_subset(store):
    rng = np.random.default_rng(2)
    q = unit(rng)
    filters = Filters(modality=["US"])
    allowed = store.matching_ids(filters)
    expected = allowed[np.argsort(-(store.vectors(allowed) @ q[0]))[:10]]
    _, ids = store.search(q, 10, filters)
    assert list(ids[0]) == list(expected)


def test_no_match_gives_no_results(store):
    _, ids = store.search(unit(np.random.default_rng(3)), 5, Filters(modality=["PT"]))
    assert (ids == -1).all()


def test_store_refuses_vectors_of_another_model(store, tmp_path):
    with pytest.raises(StoreError, match="cannot be\\s+mixed"):
        Store.open_or_create(tmp_path / "store", manifest(model_fingerprint="other"))
    with pytest.raises(StoreError, match="preprocessing_version"):
        Store.open_or_create(tmp_path / "store", manifest(preprocessing_version="v2"))
    with pytest.raises(StoreError, match="16-d"):
        with store.writer() as w:
            w.add_file(path="/x.png", size=1, mtime_ns=1, content_hash="x", source_kind="image",
                       images=[NewImage(0, 1, 1, np.ones(8, np.float32))])


def test_a_failed_transaction_changes_nothing(store):
    before = store.count
    with pytest.raises(RuntimeError):
        with store.writer() as w:
            w.remove_file("/archive/rad/f1.png")
            raise RuntimeError("killed mid-batch")
    assert store.count == before == store.stats()["images"]


def test_save_is_atomic_and_reopen_agrees(store, tmp_path):
    store.save()
    assert not list((tmp_path / "store").glob("*.tmp"))
    reopened = Store.open(tmp_path / "store")
    assert reopened.count == 200
    ids, vectors = reopened.all_vectors()
    _, found = reopened.search(vectors[:3], 1)
    assert list(found[:, 0]) == list(ids[:3])


def test_rebuild_with_another_index_type_keeps_results(store, tmp_path):
    _, vectors = store.all_vectors()
    store.rebuild("HNSW16")
    store.save()
    reopened = Store.open(tmp_path / "store")
    assert reopened.manifest.index_type == "HNSW16" and reopened.count == 200
    _, ids = reopened.search(vectors[:5], 1)
    assert list(ids[:, 0]) == [1, 2, 3, 4, 5]
    with pytest.raises(StoreError, match="invalid FAISS index type"):
        reopened.rebuild("NotAnIndex42")


def test_bad_filter_values_are_named():
    from retrieval.errors import InputError

    with pytest.raises(InputError, match="date_from"):
        Filters(date_from="last tuesday")
    with pytest.raises(InputError, match="colour"):
        Filters.from_dict({"colour": "red"})


@pytest.mark.parametrize("index_type", ["HNSW16", "IVF4,Flat"])
def test_deleting_from_a_graph_index_hides_rows_without_rebuilding(store, tmp_path, index_type):
    """HNSW cannot remove, and removing from an IVF behind an id map would misaddress rows:
    deleted rows are hidden at once, the index rebuilt only in bulk."""
    store.rebuild(index_type)
    graph = store.index
    _, vectors = store.all_vectors()
    with store.writer() as w:
        for i in range(5):
            w.remove_file(f"/archive/rad/f{i}.png" if i % 7 else f"/archive/derm/f{i}.png")
    assert store.index is graph                       # no rebuild for a few deletions
    assert store.count == 195 == store.stats()["images"]
    scores, ids = store.search(vectors[:5], 3)
    assert not set(ids.ravel()) & {1, 2, 3, 4, 5}      # the deleted rows never come back
    assert (ids >= 0).all()
    _, ids = store.search(vectors[:5], 3, Filters(modality=["CT", "MR", "CR", "US"]))
    assert not set(ids.ravel()) & {1, 2, 3, 4, 5}
    store.save()
    reopened = Store.open(tmp_path / "store")          # hidden again after a reopen
    assert reopened.count == 195
    _, ids = reopened.search(vectors[:5], 3)
    assert not set(ids.ravel()) & {1, 2, 3, 4, 5}
    inner = ann.inner_index(reopened.index)
    if isinstance(inner, faiss.IndexIVF):
        inner.nprobe = inner.nlist  # every list: the search is exact
    _, ids = reopened.search(vectors[5:], 1)
    assert (ids[:, 0] == np.arange(6, 201)).all()       # every remaining row finds itself


def test_a_batch_naming_one_source_twice_keeps_the_later(store):
    from retrieval.store import NewFile

    rng = np.random.default_rng(5)
    first, second = unit(rng, 2)
    with store.writer() as w:
        w.add_files([NewFile("/archive/twice.png", 1, 1, "a", "image", [NewImage(0, 8, 8, first)]),
                     NewFile("/archive/twice.png", 2, 2, "b", "image", [NewImage(0, 8, 8, second)])])
    assert store.stats()["images"] == 201
    _, ids = store.search(second[None], 1)
    assert np.allclose(store.vectors(ids[0]), second, atol=1e-3)  # stored as float16


def test_the_manifest_keeps_the_decode_settings_and_an_older_one_reads_as_none(tmp_path):
    import json

    path = tmp_path / "manifest.json"
    decode = {"window": "lung", "frames": "all", "series_vectors": True}
    manifest(decode=decode).write(path)
    assert Manifest.read(path).decode == decode
    doc = json.loads(path.read_text())
    del doc["decode"]  # written before the manifest recorded it
    path.write_text(json.dumps(doc))
    assert Manifest.read(path).decode is None


def test_the_store_offers_what_other_modules_read_and_write(store):
    paths = ["/archive/derm/f0.png", "/archive/rad/f1.png", "/archive/nowhere.png"]
    vectors = store.vectors_for_paths(paths)
    assert sorted(vectors) == paths[:2]
    ids = store.ids_for_path(paths[1])
    assert len(ids) == 1 and np.allclose(store.vectors(list(ids))[0], vectors[paths[1]])
    assert store.ids_for_path(paths[2]) == set()
    assert store.vector_ids().tolist() == sorted(store.vector_ids().tolist())
    assert len(store.image_keys()) == 200
    with store.writer() as w:
        w.record_failure("/archive/broken.png", "not an image")
        w.add_labels([(int(i), "nodule", 0.9) for i in ids], "zero-shot:test")
        w.set_setting("tags:zero-shot:test", "{}")
    assert store.failures() == {"/archive/broken.png": "not an image"}
    assert store.labels("zero-shot:test") == [(paths[1], 0, "nodule", 0.9)]
    assert store.setting("tags:zero-shot:test") == "{}" and store.setting_keys("tags:") == {
        "tags:zero-shot:test"}
    with store.writer() as w:
        assert w.failure_paths() == ["/archive/broken.png"]
        assert w.remove_labels("zero-shot:test") == 1
    assert store.labels("zero-shot:test") == []
