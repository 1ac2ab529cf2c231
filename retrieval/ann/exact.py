"""Exact inner-product top-k over raw float32 vectors, at the speed of one matrix product.

FAISS's own ``IndexFlatIP.search`` is several times slower on a small shared machine (its
bundled OpenMP BLAS spins at barriers when a core is busy, and it updates per-query heaps
after small database blocks; figures in benchmarks/README.md). So: numpy's BLAS for the
product (large database blocks against the whole query batch, bounded memory), torch's topk
for a batch's selection, on zero-copy views. A single query is a matrix-vector product bounded
by memory bandwidth (n·d·4 bytes per query), where numpy's gemv reads about twice torch's rate;
its selection is numpy's partition (no torch import: `similar --id` runs without a model), and
equal scores rank by row position, so the command line and the server order ties alike.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

#: Upper bound on one block's score matrix (queries × rows) in float32 elements (~128 MiB).
SCORE_BLOCK_ELEMENTS = 32 * 1024 * 1024


def _as_array(array: Any) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor exists only where torch is imported already
    if torch is not None and isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    return np.ascontiguousarray(array, dtype=np.float32)


def exact_topk(queries: Any, vectors: Any, ids: np.ndarray | None,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) by inner product, best first, padded FAISS-style (-inf, -1).

    ``queries`` and ``vectors`` are numpy arrays or torch tensors; ``vectors`` is n×d float32
    (a zero-copy view of an index's storage is fine: it is only read); ``ids`` maps row
    positions to ids (None: the positions themselves).
    """
    q = np.atleast_2d(_as_array(queries))
    x = _as_array(vectors)
    nq, n = q.shape[0], x.shape[0]
    k = max(1, int(k))
    out_scores = np.full((nq, k), -np.inf, np.float32)
    out_ids = np.full((nq, k), -1, np.int64)
    if n == 0 or nq == 0:
        return out_scores, out_ids
    if x.shape[1] != q.shape[1]:
        raise ValueError(f"queries are {q.shape[1]}-d, vectors {x.shape[1]}-d")
    take = min(k, n)
    if nq == 1:
        best_s, positions = _one_query(q[0], x, take)
        out_scores[0, :take] = best_s
        out_ids[0, :take] = positions if ids is None else np.asarray(ids, np.int64)[positions]
        return out_scores, out_ids
    import torch

    with torch.inference_mode():
        best_s, positions = _batch(torch, q, x, take)
    out_scores[:, :take] = best_s
    out_ids[:, :take] = positions if ids is None else np.asarray(ids, np.int64)[positions]
    return out_scores, out_ids


def _one_query(q: np.ndarray, x: np.ndarray, take: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row positions) of one query's best ``take`` rows, ties by position."""
    best_s = np.empty(0, np.float32)
    best_i = np.empty(0, np.int64)
    for start in range(0, x.shape[0], SCORE_BLOCK_ELEMENTS):
        scores = x[start:start + SCORE_BLOCK_ELEMENTS] @ q
        keep = min(take, scores.shape[0])
        top = np.argpartition(-scores, keep - 1)[:keep] if keep < scores.shape[0] else \
            np.arange(scores.shape[0])
        best_s = np.concatenate([best_s, scores[top]])
        best_i = np.concatenate([best_i, top.astype(np.int64) + start])
        order = np.lexsort((best_i, -best_s))[:take]
        best_s, best_i = best_s[order], best_i[order]
    return best_s, best_i


def _batch(torch, q: np.ndarray, x: np.ndarray, take: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row positions) of a batch's best ``take`` rows each, by torch's topk."""
    nq, n = q.shape[0], x.shape[0]
    block = max(4096, SCORE_BLOCK_ELEMENTS // nq)
    best_s = None
    best_i = None
    for start in range(0, n, block):
        part = x[start:start + block]
        scores = torch.from_numpy(q @ part.T)
        s, i = torch.topk(scores, min(take, part.shape[0]), dim=1)
        i += start
        if best_s is None:
            best_s, best_i = s, i
        else:
            merged_s = torch.cat([best_s, s], dim=1)
            merged_i = torch.cat([best_i, i], dim=1)
            best_s, pos = torch.topk(merged_s, take, dim=1)
            best_i = torch.gather(merged_i, 1, pos)
    return best_s.numpy(), best_i.numpy()


def flat_storage(index) -> np.ndarray | None:
    """A zero-copy n×d float32 view of a FAISS IndexFlat's vectors (None for other types)."""
    import faiss

    base = faiss.downcast_index(index)
    if not isinstance(base, faiss.IndexFlat) or base.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    n, d = int(base.ntotal), int(base.d)
    if n == 0:
        return np.zeros((0, d), np.float32)
    return faiss.rev_swig_ptr(base.get_xb(), n * d).reshape(n, d)
