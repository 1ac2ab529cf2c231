"""The persistent text-embedding cache: a repeated query never loads the text tower, gives the
same results, and the cache file holds no query text."""

from __future__ import annotations

import json
import os
import stat

import numpy as np

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
