"""Raw vectors stored as float16: fidelity, re-ranking, block-wise reads, the migration of
float32 stores (restartable after a kill -9), integrity."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from alembic import command

from retrieval import ann
from retrieval.ann.search import fetched_topk
from retrieval.errors import StoreError
from retrieval.store import Manifest, NewFile, NewImage, Store, blobs, migrations

ROOT = Path(__file__).resolve().parents[1]


def unit(rng, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def make_store(root: Path, vectors: np.ndarray, index_type: str = "Flat") -> tuple[Store, list[int]]:
    store = Store.create(root, Manifest(model="m", model_revision="local", model_fingerprint="f",
                                        dim=vectors.shape[1], preprocessing_version="v1",
                                        index_type=index_type))
    ids: list[int] = []
    for start in range(0, len(vectors), 2000):
        with store.writer() as w:
            ids += [i[0] for i in w.add_files([
                NewFile(f"/a/{i}.png", 1, 1, str(i), "image", [NewImage(0, 8, 8, vectors[i])])
                for i in range(start, min(start + 2000, len(vectors)))])]
    return store, ids


# -- the format ------------------------------------------------------------------------------
def test_float16_keeps_cosine_to_float32_on_synthetic_unit_vectors():
    x = unit(np.random.default_rng(0), 2000, 1152)
    back = blobs.decode(blobs.encode(x), 1152)
    assert back.dtype == np.float32 and back.shape == x.shape
    assert cosines(back, x).min() >= 0.99999
    assert len(blobs.encode(x)[0]) == 2 * 1152 == blobs.blob_size(1152)


def test_float16_keeps_cosine_on_real_embeddings_of_the_tiny_model(tiny_model):
    import torch

    from retrieval.model.encoders import VisionEncoder

    encoder = VisionEncoder.load(str(tiny_model), device="cpu", precision="fp32")
    size = encoder.image_size
    batch = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (16, 3, size, size))
                             .astype(np.float32))
    x = encoder.embed_batch(batch)
    assert cosines(blobs.decode(blobs.encode(x), encoder.dim), x).min() >= 0.99999


def test_either_format_decodes_and_a_wrong_size_is_refused():
    x = unit(np.random.default_rng(2), 3, 8)
    mixed = [x[0].astype(np.float16).tobytes(), x[1].tobytes(), x[2].astype(np.float16).tobytes()]
    np.testing.assert_allclose(blobs.decode(mixed, 8), x, atol=1e-3)
    assert blobs.decode(mixed, 8)[1].tobytes() == x[1].tobytes()  # float32 read exactly
    with pytest.raises(StoreError, match="no 8 values"):
        blobs.decode([b"\0" * 10], 8)
    with pytest.raises(StoreError, match="float16 cannot store"):
        blobs.encode(np.full((1, 8), 1e6, np.float32))


# -- reading in blocks, re-ranking ------------------------------------------------------------
def test_blockwise_fetch_equals_one_exact_scan():
    rng = np.random.default_rng(3)
    x, q = unit(rng, 1000, 32), unit(rng, 4, 32)
    ids = np.arange(1000, 2000, dtype=np.int64)
    fetch = lambda wanted: x[np.asarray(wanted) - 1000]  # noqa: E731
    whole = ann.exact_topk(q, x, ids, 10)
    for block in (7, 100, 999, 5000):
        blocked = fetched_topk(q, ids, 10, fetch, block=block)
        np.testing.assert_array_equal(blocked[1], whole[1])
        np.testing.assert_allclose(blocked[0], whole[0], rtol=1e-6)


def test_reranked_results_equal_float32_reranking(tmp_path):
    """An IVF-PQ index re-ranked from the stored float16 vectors gives the same top-10 ids as
    re-ranking from the float32 originals (and the same order but for float16-close ties)."""
    rng = np.random.default_rng(4)
    centres = unit(rng, 40, 64)
    x = centres[rng.integers(0, 40, 4000)] + 0.35 * unit(rng, 4000, 64)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    store, ids = make_store(tmp_path / "s", x)
    ids = np.asarray(ids, np.int64)
    index = faiss.IndexIDMap2(faiss.index_factory(64, "IVF32,PQ8x4", faiss.METRIC_INNER_PRODUCT))
    index.train(x)
    index.add_with_ids(x, ids)
    faiss.extract_index_ivf(index).nprobe = 8
    position = {int(i): n for n, i in enumerate(ids)}
    fp32 = lambda wanted: x[[position[int(i)] for i in wanted]]  # noqa: E731
    queries = unit(rng, 30, 64)
    for allowed in (None, ids[::3]):  # plain re-ranking; a filtered query answered exactly
        s32, from_f32 = ann.search_index(index, queries, 10, allowed=allowed,
                                         fetch_vectors=fp32, rerank=10)
        _, from_f16 = ann.search_index(index, queries, 10, allowed=allowed,
                                       fetch_vectors=store.vectors, rerank=10)
        for got, want in zip(from_f16, from_f32):
            assert set(got) == set(want)  # the same top-10 ids
        # in the same order, but for neighbours whose float32 scores differ by less than
        # float16's rounding (~1e-4 at d=64): such near-ties may swap
        swapped = from_f16 != from_f32
        got_scores = np.einsum("qd,qkd->qk", queries, fp32(from_f16.ravel()).reshape(30, 10, 64))
        assert swapped.mean() < 0.02
        assert np.abs(got_scores - s32)[swapped].max(initial=0) < 2e-4
    store.close()


def test_the_index_fed_at_write_time_equals_one_rebuilt_from_the_rows(tmp_path):
    x = unit(np.random.default_rng(5), 50, 16)
    store, ids = make_store(tmp_path / "s", x)
    fed = ann.flat_storage(ann.inner_index(store.index)).copy()
    store.rebuild("Flat")
    np.testing.assert_array_equal(ann.flat_storage(ann.inner_index(store.index)), fed)
    np.testing.assert_array_equal(store.vectors(ids), fed)
    store.close()


# -- migrating float32 stores ------------------------------------------------------------------
def as_legacy(root: Path, ids: list[int], x: np.ndarray) -> None:
    """What a store written before the float16 migration (0003) holds: float32 blobs, the
    revision before it."""
    with sqlite3.connect(root / "meta.sqlite") as con:
        con.executemany("UPDATE vectors SET vector = ? WHERE image_id = ?",
                        [(v.tobytes(), i) for i, v in zip(ids, x)])
        con.execute("UPDATE alembic_version SET version_num = 'store_state'")
        con.execute("DELETE FROM settings WHERE key = 'vector_format'")
    con.close()


def blob_sizes(root: Path) -> dict[int, int]:
    with sqlite3.connect(root / "meta.sqlite") as con:
        found = dict(con.execute("SELECT length(vector), count(*) FROM vectors GROUP BY 1"))
    con.close()
    return found


def assert_migrated(root: Path, ids: list[int], x: np.ndarray) -> None:
    store = Store.open(root)
    assert migrations.current(store.engine) == migrations.head()
    assert store.setting(blobs.FORMAT_SETTING) == "float16"
    assert blob_sizes(root) == {2 * x.shape[1]: len(ids)}
    assert cosines(store.vectors(ids), x).min() >= 0.99999
    assert store.check()["ok"] and store.index_problem is None  # the index file stays valid
    _, found = store.search(x[:5], 1)
    assert found[:, 0].tolist() == ids[:5]
    store.close()


def test_a_float32_store_is_migrated_on_open(tmp_path):
    x = unit(np.random.default_rng(6), 300, 16)
    store, ids = make_store(tmp_path / "s", x)
    store.close()
    as_legacy(tmp_path / "s", ids, x)
    assert blob_sizes(tmp_path / "s") == {64: 300}
    assert_migrated(tmp_path / "s", ids, x)


KILL_SCRIPT = r"""
import os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
from retrieval.store import Store
seen = {"COMMIT": 0, "UPDATE": 0}
kill_after = sys.argv[2]

@event.listens_for(Engine, "after_cursor_execute")
def _maybe_die(conn, cursor, statement, parameters, context, executemany):
    word = statement.split()[0].upper()
    if word in seen:
        seen[word] += 1
    # "between": right after the first batch committed; "inside": the second batch's rows
    # are rewritten but not committed
    if (kill_after == "between" and seen["COMMIT"] == 1) or (kill_after == "inside" and seen["UPDATE"] == 2):
        os.kill(os.getpid(), signal.SIGKILL)

Store.open(sys.argv[1])
"""


@pytest.mark.parametrize("moment", ["between", "inside"])
def test_a_migration_killed_part_way_resumes_on_the_next_open(tmp_path, moment):
    x = unit(np.random.default_rng(7), 5000, 16)  # 3 batches of 2,000
    store, ids = make_store(tmp_path / "s", x)
    store.close()
    as_legacy(tmp_path / "s", ids, x)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "s"), moment],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert blob_sizes(tmp_path / "s") == {32: 2000, 64: 3000}  # one batch committed, no more
    with pytest.raises(StoreError, match="schema upgrade"):
        Store.open(tmp_path / "s", readonly=True)  # a reader never writes; the next writer does
    assert_migrated(tmp_path / "s", ids, x)


def test_downgrade_restores_float32_blobs(tmp_path):
    x = unit(np.random.default_rng(8), 20, 16)
    store, ids = make_store(tmp_path / "s", x)
    store.save()  # before the schema goes back under it: an open store needs its own schema
    engine = store.engine
    with engine.connect() as connection:
        command.downgrade(migrations.config(connection, dim=16), "0001")
    assert blob_sizes(tmp_path / "s") == {64: 20}
    store.close()
    assert_migrated(tmp_path / "s", ids, x)  # and up again


def test_check_counts_float16_and_float32_blobs_as_whole_and_flags_other_sizes(tmp_path):
    x = unit(np.random.default_rng(9), 10, 16)
    store, ids = make_store(tmp_path / "s", x)
    store.close()
    with sqlite3.connect(tmp_path / "s" / "meta.sqlite") as con:
        con.execute("UPDATE vectors SET vector = ? WHERE image_id = ?", (x[0].tobytes(), ids[0]))
        con.execute("UPDATE vectors SET vector = ? WHERE image_id = ?", (b"\0" * 48, ids[1]))
    con.close()
    report = Store.open(tmp_path / "s", readonly=True).check()
    assert report["counts"]["vectors_ok"] == 9 and report["reembed"] == ["/a/1.png"]
    assert any("no vector of 16 values" in p for p in report["problems"])
