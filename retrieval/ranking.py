"""One page of ranked results for a query vector: score thresholds, one row per patient, study
or series, near-copies dropped, and paging, over a search widened until the page is full.

The steps, in this order (each documented where a user sees it, README "Search options"):

1. candidates: the index's best ``fetch`` ids for the vector among the rows the filters
   admit, the query's own example images (positive ``#id`` terms) left out;
2. threshold: candidates scoring below the cosine threshold (``min_score``, and the cosine
   equivalent of ``min_prob``: :func:`prob_threshold`) are dropped; scores come best first,
   so the first one below ends the search;
3. distinct: each group (stored patient key, Study or Series Instance UID) is represented
   by its best-scoring candidate; an image without that key is a group of its own;
4. dedupe: a representative whose cosine to a higher-ranked kept one is >= the value is
   dropped (stored vectors, a FAISS inner-product index grown as rows are kept);
5. paging: the kept rows ``offset .. offset+k``; there is a next page when one more exists.

When fewer than ``offset + k + 1`` rows survive, ``fetch`` grows fourfold and the steps run
again, until the page is full, the store (or filtered subset) is exhausted, the scores fell
below the threshold, or :data:`MAX_CANDIDATES` is reached. A ``min_prob`` query over an
approximate index on at most :data:`EXACT_SCAN_LIMIT` candidate vectors scores every one of
their raw vectors instead, so that small stores and small filtered subsets answer exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import InputError
from .filters import Filters
from .store import Store

#: --distinct value → the images column holding the group key.
GROUP_COLUMNS = {"patient": "patient_key", "study": "study_uid", "series": "series_uid"}
#: A min-prob query scores every raw vector when the candidates are at most this many.
EXACT_SCAN_LIMIT = 20_000
#: The widened search never asks the index for more candidates than this per page.
MAX_CANDIDATES = 262_144
#: With dedupe each candidate's stored vector is read: fewer candidates, bounded memory.
MAX_DEDUPE_CANDIDATES = 32_768
#: Paging stops here: a page further down costs a search this wide.
MAX_OFFSET = 100_000
GROWTH = 4
#: An approximate index's last candidates are its least reliable: a threshold query asks for
#: this many times what it needs, and stops widening only once that many times as many
#: candidates as pass were looked at (recall measured: benchmarks/results/min_prob_50k.json).
THRESHOLD_MARGIN = 4
#: Candidates an approximate index scores this close to a threshold are re-scored exactly.
BOUNDARY = 0.01


@dataclass
class PageOptions:
    """How one page is cut from the ranking (see the module docstring for the order)."""

    k: int = 10
    offset: int = 0
    threshold: float | None = None     # lowest cosine kept (min_score and/or min_prob)
    distinct: str | None = None        # patient | study | series
    dedupe: float | None = None        # drop a row this close (cosine) to a kept higher one
    exact_scan: bool = False           # score every raw candidate vector when few enough

    def check(self) -> None:
        """Refuse values no page can be cut with, naming the setting."""
        if self.k < 1:
            raise InputError(f"k must be at least 1, got {self.k}", setting="k")
        if not 0 <= self.offset <= MAX_OFFSET:
            raise InputError(f"offset must be between 0 and {MAX_OFFSET}, got {self.offset}",
                             setting="offset")
        if self.distinct is not None and self.distinct not in GROUP_COLUMNS:
            raise InputError(f"distinct must be one of {', '.join(GROUP_COLUMNS)}, got "
                             f"{self.distinct!r}", setting="distinct")
        if self.dedupe is not None and not 0.0 <= self.dedupe <= 1.0:
            raise InputError(f"dedupe is a cosine between 0 and 1, got {self.dedupe}",
                             setting="dedupe")


@dataclass
class Hit:
    id: int
    score: float
    group_count: int | None = None


def prob_threshold(min_prob: float, scale: float, bias: float) -> float:
    """The cosine at which SigLIP's sigmoid(exp(scale)·cos + bias) reaches ``min_prob``
    (monotonic, so a probability threshold is a cosine threshold)."""
    if not 0.0 <= min_prob <= 1.0:
        raise InputError(f"min_prob is a probability between 0 and 1, got {min_prob}",
                         setting="min_prob")
    if min_prob == 0.0:
        return -math.inf
    if min_prob == 1.0:
        return math.inf
    return (math.log(min_prob / (1.0 - min_prob)) - bias) / math.exp(scale)


def probability(cosine: float, scale: float, bias: float) -> float:
    """SigLIP's match probability of one cosine (overflow-free logistic)."""
    return 0.5 * (1.0 + math.tanh(0.5 * (math.exp(scale) * cosine + bias)))


def check_patient_keys(store: Store) -> None:
    """``distinct patient`` needs stored patient keys; a store indexed under the PHI policy
    "drop" has none (rows are then refused clearly rather than each being its own group)."""
    if store.count and not store.db.has_patient_keys():
        raise InputError(
            f'distinct "patient" needs patient keys, and store {store.root} holds none: it was '
            'indexed with the PHI policy "drop" (or holds no DICOM image with a PatientID). '
            'Use distinct "study" or "series", or re-index with the PHI policy "hash".',
            setting="distinct")


def _index_is_exact(store: Store) -> bool:
    from .ann import flat_storage, inner_index

    return flat_storage(inner_index(store.index)) is not None


Search = Callable[[int], tuple[np.ndarray, np.ndarray]]


def _scan(store: Store, vector: np.ndarray, ids: np.ndarray) -> Search:
    """Every candidate's exact score from its raw vector, ranked once; ``fetch`` slices it."""
    scores = np.concatenate([store.vectors(ids[s:s + 4096]) @ vector
                             for s in range(0, len(ids), 4096)]) if len(ids) else np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    ranked_s, ranked_i = scores[order].astype(np.float32), ids[order]
    return lambda fetch: (ranked_s[None, :fetch], ranked_i[None, :fetch])


class _Reducer:
    """Steps 3 and 4 over a ranked candidate list, caching what it read from the store."""

    def __init__(self, store: Store, opts: PageOptions, stop: int) -> None:
        self.store, self.opts, self.stop = store, opts, stop
        self.keys: dict[int, str | None] = {}
        self.vectors: dict[int, np.ndarray] = {}

    def __call__(self, hits: list[Hit]) -> list[Hit]:
        if self.opts.distinct:
            hits = self._distinct(hits)
        if self.opts.dedupe is not None:
            hits = self._dedupe(hits)
        return hits

    def _distinct(self, hits: list[Hit]) -> list[Hit]:
        column = GROUP_COLUMNS[self.opts.distinct]
        unknown = [h.id for h in hits if h.id not in self.keys]
        if unknown:
            self.keys.update(self.store.db.group_keys(unknown, column))
        seen: set = set()
        out = []
        for hit in hits:
            key = self.keys.get(hit.id)
            group = ("key", key) if key is not None else ("id", hit.id)
            if group not in seen:
                seen.add(group)
                out.append(Hit(hit.id, hit.score))
        return out

    def _dedupe(self, hits: list[Hit]) -> list[Hit]:
        import faiss

        kept_index = faiss.IndexFlatIP(self.store.dim)
        kept = []
        for at, hit in enumerate(hits):
            if hit.id not in self.vectors:  # read in blocks, only as far as the page needs
                self._read([h.id for h in hits[at:at + 1024] if h.id not in self.vectors])
            v = self.vectors[hit.id][None, :]
            if kept_index.ntotal:
                nearest, _ = kept_index.search(v, 1)
                if nearest[0, 0] >= self.opts.dedupe:
                    continue
            kept_index.add(v)
            kept.append(hit)
            if len(kept) >= self.stop:
                break
        return kept

    def _read(self, ids: list[int]) -> None:
        raw = np.ascontiguousarray(self.store.vectors(ids), np.float32)
        raw /= np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
        self.vectors.update(zip(ids, raw))


def rank_page(store: Store, vector: np.ndarray, opts: PageOptions, filters: Filters | None = None,
              exclude: set[int] | None = None) -> tuple[list[Hit], bool]:
    """(the page's hits, whether a next page exists) for one unit query vector."""
    opts.check()
    exclude = exclude or set()
    vector = np.ascontiguousarray(vector, np.float32)
    allowed = None if filters is None or filters.empty else store.matching_ids(filters)
    total = len(allowed) if allowed is not None else store.count
    if total == 0:
        return [], False
    need = opts.offset + opts.k + 1
    margin = 1
    if opts.exact_scan and total <= EXACT_SCAN_LIMIT and not _index_is_exact(store):
        search = _scan(store, vector, allowed if allowed is not None else store.vector_ids())
    else:
        def search(fetch: int) -> tuple[np.ndarray, np.ndarray]:
            return store.vector_index.search(vector[None, :], fetch, allowed, store.vectors)
        margin = 1 if _index_is_exact(store) or opts.threshold is None else THRESHOLD_MARGIN
    reduce = _Reducer(store, opts, need)
    rescored: dict[int, float] = {}
    ceiling = min(total + len(exclude),
                  MAX_CANDIDATES if opts.dedupe is None else MAX_DEDUPE_CANDIDATES)
    grouped = opts.distinct is not None or opts.dedupe is not None
    fetch = max(1, min(need * (GROWTH if grouped else margin) + len(exclude), ceiling))
    while True:
        scores, ids = search(fetch)
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        hits = [Hit(i, s) for i, s in pairs if i not in exclude]
        below = False
        if opts.threshold is not None:
            if margin > 1:
                hits = _exact_near(store, vector, hits, opts.threshold, rescored)
            passing = [h for h in hits if h.score >= opts.threshold]
            below, hits = len(passing) * margin <= len(hits) and len(passing) < len(hits), passing
        units = reduce(hits)
        if len(units) >= need or below or len(pairs) < fetch or fetch >= ceiling:
            break
        fetch = min(fetch * GROWTH, ceiling)
    page = units[opts.offset:opts.offset + opts.k]
    if opts.distinct:
        _count_groups(store, vector, page, reduce.keys, opts, allowed, exclude)
    return page, len(units) > opts.offset + opts.k


def _exact_near(store: Store, vector: np.ndarray, hits: list[Hit], threshold: float,
                cache: dict[int, float]) -> list[Hit]:
    """Hits re-ranked with exact scores for those an approximate index scored within
    :data:`BOUNDARY` of the threshold (SQ8 codes are off by ~1e-3), so that what passes a
    min-prob threshold is decided on the stored vectors."""
    near = [h.id for h in hits if abs(h.score - threshold) < BOUNDARY and h.id not in cache]
    for start in range(0, len(near), 4096):
        part = near[start:start + 4096]
        cache.update(zip(part, (store.vectors(part) @ vector).tolist()))
    if not any(h.id in cache for h in hits):
        return hits
    exact = [Hit(h.id, cache.get(h.id, h.score)) for h in hits]
    return sorted(exact, key=lambda h: -h.score)


def _count_groups(store: Store, vector: np.ndarray, page: list[Hit], keys: dict,
                  opts: PageOptions, allowed: np.ndarray | None, exclude: set[int]) -> None:
    """Each row's group_count: the group's stored images the query admits — passing the
    filters, not the query's own example images, and (with a threshold) scoring at least
    it against the stored vector — counted exactly over the whole store, not only over the
    candidates the search looked at. The row's own image always counts."""
    wanted = sorted({keys[h.id] for h in page if keys.get(h.id) is not None})
    members = store.db.group_members(GROUP_COLUMNS[opts.distinct], wanted) if wanted else {}
    for hit in page:
        key = keys.get(hit.id)
        if key is None:
            hit.group_count = 1
            continue
        others = np.asarray([i for i in members.get(key, []) if i != hit.id and i not in exclude],
                            np.int64)
        if allowed is not None and others.size:
            others = others[np.isin(others, allowed)]
        if opts.threshold is not None and others.size:
            scores = np.concatenate([store.vectors(others[s:s + 4096]) @ vector
                                     for s in range(0, len(others), 4096)])
            others = others[scores >= opts.threshold]
        hit.group_count = 1 + int(others.size)
