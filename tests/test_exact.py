"""The exact top-k path: same answers as brute force in float64, FAISS-style padding, blocks."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval.ann import exact
from retrieval.ann.exact import exact_topk, flat_storage


def unit(rng, n, d=64):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(q, x, ids, k):
    scores = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


@pytest.mark.parametrize("nq", [1, 7])
def test_matches_float64_reference(nq):
    rng = np.random.default_rng(nq)
    x, q = unit(rng, 3000), unit(rng, nq)
    ids = rng.permutation(10_000)[:3000].astype(np.int64)
    scores, found = exact_topk(q, x, ids, 10)
    ref_scores, ref_ids = reference(q, x, ids, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert (found == ref_ids).mean() > 0.99  # ties within float32 rounding may swap
    assert np.all(np.diff(scores, axis=1) <= 1e-7)  # best first


def test_blocks_merge_to_the_same_answer(monkeypatch):
    rng = np.random.default_rng(1)
    x, q = unit(rng, 20_000), unit(rng, 3)
    whole = exact_topk(q, x, None, 10)
    monkeypatch.setattr(exact, "SCORE_BLOCK_ELEMENTS", 3 * 4096)  # forces 5 blocks
    blocked = exact_topk(q, x, None, 10)
    np.testing.assert_array_equal(whole[1], blocked[1])
    np.testing.assert_allclose(whole[0], blocked[0], rtol=1e-6)


def test_pads_like_faiss_when_fewer_than_k():
    rng = np.random.default_rng(2)
    x, q = unit(rng, 3), unit(rng, 2)
    scores, ids = exact_topk(q, x, np.array([5, 6, 7]), 5)
    assert ids.shape == (2, 5) and (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert set(ids[0, :3]) == {5, 6, 7}
    empty_s, empty_i = exact_topk(q, np.zeros((0, 64), np.float32), None, 4)
    assert (empty_i == -1).all() and np.isneginf(empty_s).all()


def test_agrees_with_faiss_flat_and_reads_its_storage_without_copy():
    rng = np.random.default_rng(3)
    x, q = unit(rng, 5000), unit(rng, 20)
    index = faiss.IndexFlatIP(64)
    index.add(x)
    view = flat_storage(index)
    np.testing.assert_array_equal(view, x)
    assert not view.flags.owndata  # a view of FAISS's memory, not a copy
    f_scores, f_ids = index.search(q, 10)
    scores, ids = exact_topk(q, view, None, 10)
    np.testing.assert_allclose(scores, f_scores, atol=1e-5)
    assert (ids == f_ids).mean() > 0.99
    assert flat_storage(faiss.IndexHNSWFlat(64, 8)) is None
