"""An open trusts a saved index only while the rows keep the vectors token it was saved with.

Every change to the vectors table replaces the token (triggers, migration 0005), whoever
makes it; a save records the token of the rows it checked the index against, with the removed
ids the file still holds. These tests change rows behind a saved index in each way a store
meets: another writer that never saved, a hand-run SQL statement, an older copy of the
database, shard files from two saves, an older schema; each open must agree with the rows.
"""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
from alembic import command
from sqlalchemy import text

from retrieval.store import MANIFEST, Manifest, NewImage, Store, migrations
from retrieval.store.shards import shard_path
from retrieval.store.vectors import index_ids

DIM = 16


def unit(rng, n):
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def manifest(index_type: str = "Flat") -> Manifest:
    return Manifest(model="m", model_revision="local", model_fingerprint="f", dim=DIM,
                    preprocessing_version="v1", index_type=index_type)


def add(store: Store, names: range, vectors: np.ndarray) -> list[int]:
    with store.writer() as w:
        return [w.add_file(path=f"/a/{i}.png", size=1, mtime_ns=1, content_hash=f"h{i}",
                           source_kind="image", images=[NewImage(0, 8, 8, v, {})])[0]
                for i, v in zip(names, vectors)]


def new_store(tmp_path, seed: int, n: int, index_type: str = "Flat", db: str | None = None):
    """(folder, an empty store in it, ``n`` random unit vectors to add)."""
    root = tmp_path / "store"
    vectors = unit(np.random.default_rng(seed), n)
    return root, Store.create(root, manifest(index_type), db=db), vectors


def found(store: Store, vectors: np.ndarray) -> set[int]:
    """Ids the store returns as best match for each of ``vectors``."""
    _, ids = store.search(vectors, 1)
    return {int(i) for i in ids[:, 0]}


def trusted(store: Store) -> bool:
    return store.vector_index.synced is not None and store.vector_index.synced == \
        store.db.vectors_token()


def test_an_open_trusts_the_saved_index_only_while_the_rows_keep_its_token(tmp_path, backend):
    root, store, vectors = new_store(tmp_path, 0, 46, db=backend)
    first = add(store, range(40), vectors[:40])
    store.close()
    m = Manifest.read(root / MANIFEST)
    reader = Store.open(root, readonly=True)
    assert m.index_token and trusted(reader) and reader.count == 40
    reader.db.dispose()

    # another writer commits and dies before saving its index: the token moved
    writer = Store.open(root)
    later = add(writer, range(40, 43), vectors[40:43])
    writer.db.dispose()  # no save, as after kill -9
    assert Manifest.read(root / MANIFEST).index_token == m.index_token
    reader = Store.open(root, readonly=True)
    assert reader.count == 43 and found(reader, vectors[40:43]) == set(later)
    assert trusted(reader)  # compared, so known to match now
    reader.db.dispose()

    # a hand-run SQL statement deletes a vector: the trigger moves the token too
    Store.open(root, exclusive=True).close()  # a writer saves with the rows' token
    with Store.open(root, readonly=True).engine.begin() as conn:
        conn.execute(text("DELETE FROM vectors WHERE image_id = :id"), {"id": first[0]})
    reader = Store.open(root, readonly=True)
    assert reader.count == 42 and first[0] not in found(reader, vectors[:1])
    reader.db.dispose()


def test_hidden_ids_of_a_graph_index_stay_hidden_after_a_trusted_open(tmp_path):
    root, store, vectors = new_store(tmp_path, 1, 100, "HNSW32")
    ids = add(store, range(100), vectors)
    with store.writer() as w:
        w.remove_files([f"/a/{i}.png" for i in range(10)])
    store.close()
    m = Manifest.read(root / MANIFEST)
    assert m.index_hidden == sorted(ids[:10]) and m.index_count == 100  # HNSW keeps them
    reader = Store.open(root, readonly=True)
    assert trusted(reader) and reader.count == 90
    assert not found(reader, vectors[:10]) & set(ids[:10])
    reader.db.dispose()


def test_a_restored_older_database_is_compared_not_trusted(tmp_path):
    root, store, vectors = new_store(tmp_path, 2, 45)
    add(store, range(30), vectors[:30])
    store.close()
    shutil.copy(root / "meta.sqlite", tmp_path / "older.sqlite")
    store = Store.open(root)
    lost = add(store, range(30, 40), vectors[30:40])
    store.close()  # the index now holds 40 ids, saved with the newer rows' token
    for suffix in ("-wal", "-shm"):
        (root / f"meta.sqlite{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "older.sqlite", root / "meta.sqlite")
    store = Store.open(root)
    assert store.count == 30 and not found(store, vectors[30:40]) & set(lost)
    fresh = add(store, range(40, 45), vectors[40:45])
    assert min(fresh) > max(lost)  # ids are never handed out twice
    store.close()
    assert trusted(Store.open(root, readonly=True))


def test_removing_enough_to_rebuild_and_adding_in_one_transaction_holds_each_id_once(tmp_path):
    """Hiding 300 ids makes the graph index rebuild from the rows, which already hold the
    transaction's new ones: they were added a second time before."""
    root, store, vectors = new_store(tmp_path, 3, 605, "HNSW32")
    add(store, range(600), vectors[:600])
    with store.writer() as w:
        w.remove_files([f"/a/{i}.png" for i in range(300)])
        for i in range(600, 605):
            w.add_file(path=f"/a/{i}.png", size=1, mtime_ns=1, content_hash=f"h{i}",
                       source_kind="image", images=[NewImage(0, 8, 8, vectors[i], {})])
    held = index_ids(store.index)
    assert store.index.ntotal == 305 and len(np.unique(held)) == 305
    store.close()


def test_shard_files_of_two_saves_are_compared_not_trusted(tmp_path):
    root, store, vectors = new_store(tmp_path, 4, 60)
    add(store, range(40), vectors[:40])
    store.rebuild("Flat", shards=2)
    store.save()
    assert trusted(Store.open(root, readonly=True))
    shutil.copy(shard_path(root, 0), tmp_path / "shard0.old")
    later = add(store, range(40, 60), vectors[40:])
    store.close()
    # a kill mid-renames: shard 0 from the first save (it matches its previous record)
    shutil.copy(tmp_path / "shard0.old", shard_path(root, 0))
    reader = Store.open(root, readonly=True)
    assert reader.index_problem is None and reader.count == 60
    assert found(reader, vectors[40:]) == set(later)
    reader.db.dispose()


def test_a_read_only_open_of_the_previous_schema_compares_then_a_writer_upgrades(tmp_path):
    root, store, vectors = new_store(tmp_path, 5, 20)
    add(store, range(20), vectors)
    store.close()
    store = Store.open(root)
    with store.engine.connect() as conn:
        command.downgrade(migrations.config(conn), "0004_cohorts")
        conn.commit()
    store.db.dispose()
    with sqlite3.connect(root / "meta.sqlite") as con:
        assert "vectors_token" not in {r[1] for r in con.execute("PRAGMA table_info(store_state)")}
        con.execute("DELETE FROM vectors WHERE image_id = (SELECT min(image_id) FROM vectors)")
    reader = Store.open(root, readonly=True)  # cannot upgrade: reads without the token
    assert reader.count == 19 and reader.vector_index.synced is None
    reader.db.dispose()
    Store.open(root, exclusive=True).close()  # upgraded; the writer saves with the token
    reader = Store.open(root, readonly=True)
    assert trusted(reader) and reader.count == 19
    reader.db.dispose()
