"""Query execution over a FAISS index: plain and filtered top-k, re-ranking, thread use.

Filtered search keeps its recall by answering exactly over the selected subset when it is
small, and otherwise by widening the graph/list search in proportion to the selectivity.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import faiss
import numpy as np

from .exact import exact_topk, flat_storage
from .policy import inner_index, shard_list, shard_of

#: A filtered query over at most this many selected rows is answered exactly from raw vectors.
EXACT_SUBSET_LIMIT = 20_000
#: A small subset is ranked on the index's decoded codes, then this many × k re-scored exactly.
SUBSET_RERANK = 10
#: Raw vectors are fetched and scored this many ids at a time (float32: 18 MiB at d=1152), so
#: re-ranking or an exact subset scan holds one block, however many candidates there are.
FETCH_BLOCK = 4096
MAX_EF_SEARCH = 4096


def search_parameters(index: faiss.Index, k: int, selectivity: float = 1.0,
                      selector: faiss.IDSelector | None = None):
    """Search parameters widened for a filter that lets ``selectivity`` of the rows through.

    A graph or inverted-list search visits a fixed number of candidates; when a filter drops
    most of them, fewer than k good ones survive. Widening in proportion to 1/selectivity
    keeps the number of *surviving* candidates about what an unfiltered search sees.
    """
    base = inner_index(index)
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(
            efSearch=widened_ef(base.hnsw.efSearch, k, selectivity), sel=selector)
    if isinstance(base, faiss.IndexIVF):
        return faiss.SearchParametersIVF(
            nprobe=widened_nprobe(max(base.nprobe, 1), base.nlist, selectivity), sel=selector)
    return faiss.SearchParameters(sel=selector) if selector is not None else None


def widened_ef(ef: int, k: int, selectivity: float = 1.0) -> int:
    """HNSW efSearch for a filter passing ``selectivity`` of the rows (any HNSW library)."""
    ef = max(ef, k)
    if selectivity >= 1.0:
        return ef
    widen = 1.0 / max(selectivity, 1e-6)
    return int(min(MAX_EF_SEARCH, max(ef, math.ceil(ef * widen ** 0.75), 4 * k * widen ** 0.5)))


def widened_nprobe(nprobe: int, nlist: int, selectivity: float = 1.0) -> int:
    """IVF lists to probe for a filter passing ``selectivity`` of the rows."""
    widen = 1.0 / max(selectivity, 1e-6)
    return int(min(nlist, math.ceil(nprobe * widen ** 0.75)))


def index_positions(index: faiss.Index) -> np.ndarray | None:
    """Row position → id of an IndexIDMap(2), as a zero-copy view (None when not wrapped)."""
    base = faiss.downcast_index(index)
    if not isinstance(base, faiss.IndexIDMap):
        return None
    if base.id_map.size() == 0:
        return np.zeros(0, np.int64)
    return faiss.rev_swig_ptr(base.id_map.data(), base.id_map.size()).view(np.int64)


@contextmanager
def _threads_for(nq: int):
    """One OpenMP thread for tiny batches: a parallel region whose second thread waits for a
    busy core costs milliseconds (measured: 1 query through IndexIDMap2 took 10 ms, 2 ms
    without its parallel id translation)."""
    if nq >= 8:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _bitmap_selector(mask: np.ndarray) -> faiss.IDSelectorBitmap:
    """A FAISS selector admitting the index rows where ``mask`` is true; it holds on to its
    packed bitmap, which FAISS reads through a raw pointer during the search."""
    bitmap = np.packbits(mask, bitorder="little")
    selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
    selector.referenced_objects = [bitmap]
    return selector


def _empty(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)


def search_index(index: faiss.Index, queries: np.ndarray, k: int, *,
                 allowed: np.ndarray | None = None,
                 fetch_vectors: Callable[[np.ndarray], np.ndarray] | None = None,
                 rerank: int = 0, hidden: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids), best first, for an (optionally id-mapped) FAISS index.

    Flat indexes are answered by :func:`exact_topk` over their storage (faster than FAISS's
    own flat search). Others are searched directly (ids translated here, not by FAISS's
    wrapper). ``allowed`` restricts the result to those ids: exactly over the subset when it
    is small and ``fetch_vectors`` (ids → raw vectors) is given, else through a bitmap
    selector with a search widened for the selectivity. ``rerank`` re-scores rerank·k
    candidates exactly from ``fetch_vectors``. ``hidden`` ids (deleted rows still inside a
    graph that cannot remove them) are excluded by the same bitmap selector.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    nq, k = len(queries), max(1, int(k))
    n = int(index.ntotal)
    base = inner_index(index)
    positions = index_positions(index)
    storage = flat_storage(base)
    if allowed is not None:
        allowed = np.asarray(allowed, np.int64)
        if allowed.size == 0:
            return _empty(nq, k)
    if n == 0:  # also an untrained index that has not seen a vector yet
        return _empty(nq, k)
    if storage is not None:
        if allowed is None:
            return exact_topk(queries, storage, positions, k)
        keep = np.flatnonzero(np.isin(positions, allowed)) if positions is not None else allowed
        return exact_topk(queries, storage[keep], keep if positions is None else positions[keep], k)
    if allowed is not None and allowed.size <= EXACT_SUBSET_LIMIT and fetch_vectors is not None:
        return _small_subset(index, queries, allowed, k, fetch_vectors)
    selector, selectivity = None, 1.0
    hiding = hidden is not None and hidden.size > 0
    if allowed is not None or hiding:
        ids_at = positions if positions is not None else np.arange(n)
        mask = np.isin(ids_at, allowed) if allowed is not None else np.ones(n, bool)
        if hiding:
            mask &= ~np.isin(ids_at, hidden)
        selector = _bitmap_selector(mask)
        selectivity = max(int(mask.sum()), 1) / n
    params = search_parameters(base, k, selectivity, selector)
    fetch = k * rerank if rerank and fetch_vectors is not None else k
    with _threads_for(nq):
        scores, found = base.search(queries, fetch, params=params)
    if positions is not None:
        found = np.where(found >= 0, positions[np.maximum(found, 0)], -1)
    if fetch == k:
        return scores, found
    return _rerank(queries, found, k, fetch_vectors)


def _small_subset(index: faiss.Index, queries: np.ndarray, allowed: np.ndarray, k: int,
                  fetch_vectors: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over a few selected rows, exact in the end.

    Reading thousands of raw vectors from SQLite per query is slow (~40 ms per 1,000 rows), so
    when the index can decode its own codes for these ids (HNSW over SQ8/flat storage, IVF
    with its direct map: :func:`retrieval.ann.policy.enable_lookup`) the subset is ranked on
    those in memory and only the best ``SUBSET_RERANK``·k are re-scored from the raw vectors.
    """
    if allowed.size > SUBSET_RERANK * k:
        candidates = _scan_graph_codes(index, queries, allowed, SUBSET_RERANK * k)
        if candidates is None:
            try:
                approx = index.reconstruct_batch(np.ascontiguousarray(allowed, np.int64))
            except RuntimeError:  # an index that cannot decode by id, or an unknown id
                approx = None
            if approx is not None:
                _, candidates = exact_topk(queries, approx, allowed, SUBSET_RERANK * k)
        if candidates is not None:
            return _rerank(queries, candidates, k, fetch_vectors)
    return fetched_topk(queries, allowed, k, fetch_vectors)


def fetched_topk(queries: np.ndarray, ids: np.ndarray, k: int,
                 fetch_vectors: Callable[[np.ndarray], np.ndarray],
                 block: int = FETCH_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, ids) of ``queries`` over ``ids``, their raw vectors fetched and
    scored ``block`` ids at a time and the partial top-k merged (memory stays bounded)."""
    ids = np.asarray(ids, np.int64)
    best = exact_topk(queries, fetch_vectors(ids[:block]), ids[:block], k)
    for start in range(block, len(ids), block):
        part = ids[start:start + block]
        found = exact_topk(queries, fetch_vectors(part), part, k)
        scores = np.concatenate([best[0], found[0]], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # earlier block wins a tie
        best = (np.take_along_axis(scores, order, 1),
                np.take_along_axis(np.concatenate([best[1], found[1]], axis=1), order, 1))
    return best


def _scan_graph_codes(index: faiss.Index, queries: np.ndarray, allowed: np.ndarray,
                      m: int) -> np.ndarray | None:
    """Best ``m`` ids per query among ``allowed``, scored on a graph index's stored codes.

    FAISS scans the codes in place and scores only the rows a bitmap admits, instead of
    decoding every selected row into a float array first: 9–13 vs 23–31 ms for 10k of 100k
    rows. Marking the bitmap costs a pass over every row, so a selection under 1/64 of the
    index is decoded instead (None).
    """
    base, positions = inner_index(index), index_positions(index)
    n = int(index.ntotal)
    if not isinstance(base, faiss.IndexHNSW) or allowed.size * 64 < n:
        return None
    storage = faiss.downcast_index(base.storage)
    if not isinstance(storage, faiss.IndexFlatCodes):
        return None
    ids_at = positions if positions is not None else np.arange(n)
    params = faiss.SearchParameters(sel=_bitmap_selector(np.isin(ids_at, allowed)))
    with _threads_for(len(queries)):
        _, rows = storage.search(queries, m, params=params)
    return np.where(rows >= 0, ids_at[np.maximum(rows, 0)], -1)


def _rerank(queries: np.ndarray, candidates: np.ndarray, k: int,
            fetch_vectors: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for row, (query, cand) in enumerate(zip(queries, candidates)):
        cand = cand[cand >= 0]
        if cand.size:
            s, i = fetched_topk(query[None], cand, k, fetch_vectors)
            out_s[row], out_i[row] = s[0], i[0]
    return out_s, out_i


# -- a sharded index (retrieval.ann.policy.sharded): every shard searched, the best k merged ---
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _shard_pool() -> ThreadPoolExecutor:
    """One process-wide pool for shard searches (threads: FAISS, BLAS and torch release the
    GIL, so shards run in parallel without copying the index into other processes)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(2, min(32, os.cpu_count() or 2)),
                                       thread_name_prefix="medsearch-shard")
        return _POOL


def search_shards(index: faiss.Index, queries: np.ndarray, k: int, *,
                  allowed: np.ndarray | None = None,
                  fetch_vectors: Callable[[np.ndarray], np.ndarray] | None = None,
                  rerank: int = 0, hidden: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) over a sharded index, as :func:`search_index` over one index.

    Each shard is searched (in its own thread; exact Flat shards in turn) by
    :func:`search_index` over the ids it holds
    (id % N: ``allowed`` and ``hidden`` are split without a lookup), so the exact Flat path,
    the filter selectors widened for the shard's selectivity, the small-subset path and the
    re-ranking work per shard as they do for one index; the shards' top-k are then merged.
    Flat shards give exactly the unsharded answer; IVF shards share one quantiser and probe
    the same lists; with ``rerank`` each shard gives its best rerank·k candidates by their
    codes and the merged best rerank·k are re-scored once, so a sharded PQ index re-ranks the
    candidates one index would (each shard re-ranking its own would read N times the raw
    vectors and answer differently)."""
    parts = shard_list(index)
    if len(parts) == 1:
        return search_index(index, queries, k, allowed=allowed, fetch_vectors=fetch_vectors,
                            rerank=rerank, hidden=hidden)
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    k, n = max(1, int(k)), len(parts)
    allowed = None if allowed is None else np.asarray(allowed, np.int64)
    hidden = None if hidden is None else np.asarray(hidden, np.int64)

    pooled = k * rerank if rerank and fetch_vectors is not None else k

    def one(number: int) -> tuple[np.ndarray, np.ndarray]:
        mine = None if allowed is None else allowed[shard_of(allowed, n) == number]
        hide = None if hidden is None else hidden[shard_of(hidden, n) == number]
        return search_index(parts[number], queries, pooled, allowed=mine,
                            fetch_vectors=fetch_vectors, hidden=hide)

    if flat_storage(inner_index(parts[0])) is not None:
        # exact shards are scanned one after another: each scan is a BLAS product that already
        # uses every core, and concurrent BLAS calls contend (measured: 4 threaded Flat shards
        # answered single queries 5x slower than one index, benchmarks/results/shards.json)
        return merge_topk([one(number) for number in range(n)], k)
    # the OpenMP threads one search would use, shared out: N teams of all cores oversubscribe
    threads = max(1, faiss.omp_get_max_threads() // n)

    def in_worker(number: int) -> tuple[np.ndarray, np.ndarray]:
        faiss.omp_set_num_threads(threads)  # this worker thread's own setting
        return one(number)

    merged = merge_topk(list(_shard_pool().map(in_worker, range(n))), pooled)
    return merged if pooled == k else _rerank(queries, merged[1], k, fetch_vectors)


def merge_topk(results: list[tuple[np.ndarray, np.ndarray]],
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of several (scores, ids) top-k lists per query row, best first; padding
    (-inf, -1) sorts last. Ties keep shard order (stable), so a merge is deterministic."""
    scores = np.concatenate([s for s, _ in results], axis=1)
    ids = np.concatenate([i for _, i in results], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
