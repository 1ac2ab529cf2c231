"""The persistent text-embedding cache: a repeated query never loads the text tower, gives the
same results, and the cache file holds no query text."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from retrieval.store.text_cache import TextVectorCache

from .serving import index_store, run_cli

QUERY = "left lower lobe consolidation"


def test_cache_round_trip_keyed_and_textless(tmp_path):
    cache = TextVectorCache(tmp_path, b"k" * 32, "fp1", "cpu/auto")
    vector = np.random.default_rng(0).standard_normal(1152).astype(np.float32)
    assert cache.get(QUERY) is None
    cache.put(QUERY, vector)
    assert np.array_equal(cache.get(QUERY), vector)
    cache.close()
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert QUERY.encode() not in data and b"consolidation" not in data
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o600
    # another checkpoint, another configuration or another secret: not the same entry
    assert TextVectorCache(tmp_path, b"k" * 32, "fp2", "cpu/auto").get(QUERY) is None
    assert TextVectorCache(tmp_path, b"k" * 32, "fp1", "cpu/int8").get(QUERY) is None
    assert TextVectorCache(tmp_path, b"x" * 32, "fp1", "cpu/auto").get(QUERY) is None
    assert np.array_equal(TextVectorCache(tmp_path, b"k" * 32, "fp1", "cpu/auto").get(QUERY),
                          vector)


def test_cache_keeps_the_newest_and_survives_a_broken_file(tmp_path):
    cache = TextVectorCache(tmp_path, b"k" * 32, "fp", limit=3)
    for n in range(5):
        cache.put(f"q{n}", np.full(4, n, np.float32))
    assert [cache.get(f"q{n}") is not None for n in range(5)] == [False, False, True, True, True]
    cache.close()
    cache.path.write_bytes(b"not a database" * 100)
    broken = TextVectorCache(tmp_path, b"k" * 32, "fp")
    assert broken.get("q4") is None  # off, not an exception
    broken.put("q5", np.ones(4, np.float32))


def test_repeated_search_does_not_load_the_model(tmp_path, tiny_model, image_folder, capsys):
    store = tmp_path / "store"
    index_store(store, image_folder, tiny_model)
    code, first, _ = run_cli(capsys, "search", QUERY, "--store", str(store), "--json")
    assert code == 0
    hidden = tiny_model.with_name(tiny_model.name + "-away")
    os.rename(tiny_model, hidden)  # the checkpoint is gone: only the cache can answer
    try:
        code, again, err = run_cli(capsys, "search", QUERY, "--store", str(store), "--json")
        assert code == 0, err
        a, b = json.loads(again), json.loads(first)
        for x, y in zip(a["results"], b["results"]):
            assert x == y, (x, y)
        assert a == b
        code, _, err = run_cli(capsys, "search", "a query never asked", "--store", str(store),
                               "--json")
        assert code != 0  # a new query needs the tower
    finally:
        os.rename(hidden, tiny_model)


@pytest.mark.parametrize("damage", [b"not a database" * 100,
                                    b"SQLite format 3\0" + b"\xff" * 4000])
def test_a_damaged_cache_file_is_made_again(tmp_path, damage):
    cache = TextVectorCache(tmp_path, b"k" * 32, "fp")
    cache.put(QUERY, np.ones(4, np.float32))
    cache.close()
    cache.path.write_bytes(damage)
    for suffix in ("-wal", "-shm"):
        cache.path.with_name(cache.path.name + suffix).unlink(missing_ok=True)
    remade = TextVectorCache(tmp_path, b"k" * 32, "fp")
    assert remade.get(QUERY) is None  # the damaged entries are gone, not an exception
    remade.put(QUERY, np.full(4, 2, np.float32))
    assert np.array_equal(remade.get(QUERY), np.full(4, 2, np.float32))
    remade.close()
    assert np.array_equal(TextVectorCache(tmp_path, b"k" * 32, "fp").get(QUERY),
                          np.full(4, 2, np.float32))  # and the next process uses it again


def test_a_cache_that_cannot_be_written_is_off(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    cache = TextVectorCache(blocked, b"k" * 32, "fp")
    assert cache.get(QUERY) is None
    cache.put(QUERY, np.ones(4, np.float32))
    assert cache.get(QUERY) is None
