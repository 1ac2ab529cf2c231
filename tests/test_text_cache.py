"""The persistent text-embedding cache: repeated text queries never load the model, the file
holds no query text, another model or secret misses, and no damage to it fails a search."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from retrieval.model import texttower
from retrieval.search import Searcher
from retrieval.store import Store
from retrieval.store.text_cache import FILE_NAME, TextVectorCache

from .conftest import write_images
from .serving import cli, index_store

QUERY = "pleural effusion in the left lower lobe"


@pytest.fixture()
def indexed(tmp_path, tiny_model):
    """A store built with its own copy of the tiny model (the tests move that copy away)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    write_images(tmp_path / "images", 6, seed=5)
    index_store(tmp_path / "store", tmp_path / "images", model)
    return tmp_path


def _search(root, text: str = QUERY) -> list[dict]:
    return cli("search", text, "--store", str(root / "store"), "-k", "4")["results"]


def test_a_repeated_query_never_loads_the_model(indexed):
    first = _search(indexed)
    assert first and all("prob" in r for r in first)
    loads = dict(texttower.loads)
    (indexed / "model").rename(indexed / "model-moved")  # the checkpoint is gone
    again = _search(indexed)
    assert again == first
    assert texttower.loads == loads
    assert _search(indexed, f"  {QUERY} \n") == first  # the same query, as normalised


def test_a_new_query_still_needs_the_model(indexed):
    _search(indexed)
    (indexed / "model").rename(indexed / "model-moved")
    from retrieval.errors import ModelUnavailableError

    with pytest.raises(ModelUnavailableError):
        _search(indexed, "cardiomegaly")


def test_the_cache_file_holds_no_query_text(indexed):
    _search(indexed)
    _search(indexed, "nodule on the chest")
    files = [p for p in (indexed / "store").iterdir() if p.name.startswith(FILE_NAME)]
    assert files
    for path in files:
        data = path.read_bytes()
        for text in (QUERY, "nodule on the chest", "pleural", "nodule"):
            assert text.encode() not in data and text.encode("utf-16-le") not in data
        assert path.stat().st_mode & 0o077 == 0


def test_searcher_results_equal_with_and_without_the_cache(indexed):
    store = Store.open(indexed / "store", readonly=True)
    cached = Searcher(store, device="cpu")
    plain = Searcher(store, device="cpu")
    plain._vector_cache = False  # cache off
    for _ in range(2):
        assert [r.to_json() for r in cached.text(QUERY, k=4)] == \
            [r.to_json() for r in plain.text(QUERY, k=4)]
    assert cached.text_cache.hits >= 1
    assert np.array_equal(cached.text_vector(QUERY), plain.text_vector(QUERY))


def test_another_model_fingerprint_or_secret_misses(tmp_path):
    vector = np.arange(8, dtype=np.float32) / 10
    cache = TextVectorCache(tmp_path / FILE_NAME, b"s" * 32)
    cache.put("text|aaaa|cpu|fp32|", QUERY, vector)
    assert np.array_equal(cache.get("text|aaaa|cpu|fp32|", QUERY, 8), vector)
    assert cache.get("text|bbbb|cpu|fp32|", QUERY) is None       # another model
    assert cache.get("text|aaaa|cpu|int8|", QUERY) is None       # another precision
    assert cache.get("text|aaaa|cpu|fp32|", QUERY, 16) is None   # another width
    cache.close()
    other = TextVectorCache(tmp_path / FILE_NAME, b"t" * 32)
    assert other.get("text|aaaa|cpu|fp32|", QUERY) is None       # another store secret


def test_the_cache_is_bounded_least_recently_used_first(tmp_path):
    cache = TextVectorCache(tmp_path / FILE_NAME, b"k" * 32, max_entries=5)
    for i in range(8):
        cache.put("m", f"query {i}", np.full(4, i, np.float32))
    assert len(cache) == 5
    assert cache.get("m", "query 0") is None and cache.get("m", "query 7") is not None


@pytest.mark.parametrize("damage", [b"this is not a database at all" * 100, b"",
                                    b"SQLite format 3\0" + b"\xff" * 4000])
def test_a_damaged_cache_file_is_made_again(indexed, damage):
    first = _search(indexed)
    (indexed / "store" / FILE_NAME).write_bytes(damage)
    for suffix in ("-wal", "-shm"):
        (indexed / "store" / f"{FILE_NAME}{suffix}").unlink(missing_ok=True)
    assert _search(indexed) == first
    loads = dict(texttower.loads)
    assert _search(indexed) == first
    assert texttower.loads == loads  # the remade cache answers again


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_store_folder_turns_the_cache_off(indexed):
    store = indexed / "store"
    (store / FILE_NAME).unlink(missing_ok=True)
    os.chmod(store, 0o500)
    try:
        first = _search(indexed)
        assert not (store / FILE_NAME).exists()
        assert _search(indexed) == first
    finally:
        os.chmod(store, 0o700)


def test_a_cache_file_that_cannot_be_opened_turns_the_cache_off(indexed):
    blocked = indexed / "store" / FILE_NAME
    blocked.unlink(missing_ok=True)
    blocked.mkdir()  # what a read-only folder does to root, who may write anywhere
    first = _search(indexed)
    loads = dict(texttower.loads)
    assert _search(indexed) == first
    assert texttower.loads != loads  # no cache: the model was loaded again
