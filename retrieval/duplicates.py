"""Near-identical images among stored vectors: every pair above a cosine threshold, found by
batched FAISS range searches (never an n² loop in Python), joined into groups by union-find.

Up to :data:`EXACT_LIMIT` vectors every pair is compared (a flat range search: exact). Beyond,
a temporary inverted-file index over the raw vectors is probed in :data:`PROBES` lists per
vector: two vectors with cosine ≥ 0.95 are nearly always assigned to the same list, so recall
of near-copies stays ~1 while the work drops from n² to about n²·PROBES/lists (measured in
``benchmarks/duplicates.py``). Every reported cosine is recomputed from the raw vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import faiss
import numpy as np

from .errors import InputError

EXACT_LIMIT = 50_000
PROBES = 4
BLOCK = 4096
#: Range searches report inner products above the radius; this margin keeps exact ties.
RADIUS_MARGIN = 1e-5


@dataclass
class Pairs:
    """Index pairs (first < second, positions in the searched array) and their cosines."""

    first: np.ndarray
    second: np.ndarray
    cosine: np.ndarray
    method: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.first)


def check_threshold(threshold: float, name: str = "threshold") -> float:
    if not isinstance(threshold, (int, float)) or not 0.5 <= float(threshold) <= 1.0:
        raise InputError(f"{name} must be a cosine between 0.5 and 1.0, got {threshold!r}",
                         setting=name)
    return float(threshold)


def _search_index(base: np.ndarray, exact: bool) -> tuple[faiss.Index, dict]:
    dim = base.shape[1]
    if exact:
        index = faiss.IndexFlatIP(dim)
        index.add(base)
        return index, {"method": "exact", "vectors": len(base)}
    lists = int(2 ** round(math.log2(max(16.0, 4 * math.sqrt(len(base))))))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(len(base), min(len(base), lists * 40), replace=False)
    index.cp.niter = 10
    index.train(base[np.sort(sample)])
    index.add(base)
    index.nprobe = PROBES
    return index, {"method": "ivf", "lists": lists, "probes": PROBES, "vectors": len(base)}


def cross_pairs(queries: np.ndarray, base: np.ndarray, threshold: float, *,
                exact: bool | None = None, same_set: bool = False) -> Pairs:
    """Pairs (query position, base position) with cosine ≥ ``threshold``. With ``same_set``
    (queries are the base) each unordered pair is reported once and self-pairs never."""
    threshold = check_threshold(threshold)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    base = np.ascontiguousarray(base, dtype=np.float32)
    if len(queries) == 0 or len(base) == 0:
        return Pairs(*(np.zeros(0, t) for t in (np.int64, np.int64, np.float32)),
                     method={"method": "exact", "vectors": len(base)})
    if exact is None:
        exact = len(base) <= EXACT_LIMIT
    index, method = _search_index(base, exact)
    firsts, seconds = [], []
    for start in range(0, len(queries), BLOCK):
        block = queries[start:start + BLOCK]
        limits, _, found = index.range_search(block, threshold - RADIUS_MARGIN)
        rows = np.repeat(np.arange(start, start + len(block), dtype=np.int64),
                         np.diff(limits).astype(np.int64))
        keep = rows < found if same_set else np.ones(len(found), bool)
        firsts.append(rows[keep])
        seconds.append(found[keep].astype(np.int64))
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    cosine = np.einsum("ij,ij->i", queries[first], base[second]) if len(first) else \
        np.zeros(0, np.float32)
    keep = cosine >= threshold
    return Pairs(first[keep], second[keep], cosine[keep].astype(np.float32), method)


def near_pairs(vectors: np.ndarray, threshold: float, *, exact: bool | None = None) -> Pairs:
    """Every unordered pair of rows of ``vectors`` with cosine ≥ ``threshold``."""
    return cross_pairs(vectors, vectors, threshold, exact=exact, same_set=True)


def groups(pairs: list[tuple[int, int, float]]) -> list[dict]:
    """Connected groups of the pairs (by union-find), largest first: ids ascending, the
    highest and lowest cosine among the pairs that joined them."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, _ in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for x in parent:
        members.setdefault(root(x), []).append(x)
    cosines: dict[int, list[float]] = {}
    for a, _, cos in pairs:
        cosines.setdefault(root(a), []).append(cos)
    out = [{"ids": sorted(ids), "size": len(ids), "max_cos": round(max(cosines[r]), 6),
            "min_cos": round(min(cosines[r]), 6)} for r, ids in members.items()]
    out.sort(key=lambda g: (-g["size"], g["ids"][0]))
    return out


def slice_pair(a: dict, b: dict) -> bool:
    """Whether two images are parts of one acquisition, not copies: frames of one file, or
    different instances (SOP Instance UIDs) of one series. The same instance stored twice is
    never a slice pair."""
    if a["file_id"] == b["file_id"]:
        return a["frame"] != b["frame"]
    if a.get("sop_uid") and a.get("sop_uid") == b.get("sop_uid"):
        return False
    return bool(a.get("series_uid")) and a.get("series_uid") == b.get("series_uid")


def store_duplicates(store, threshold: float = 0.98, *, slices: bool = False,
                     exact: bool | None = None) -> dict:
    """Groups of near-identical stored images (``store``: retrieval.store.Store). Pairs that
    are slices of one acquisition (:func:`slice_pair`) are left out unless ``slices``."""
    ids, vectors = store.all_vectors()
    found = near_pairs(vectors, threshold, exact=exact)
    pairs = [(int(ids[a]), int(ids[b]), float(c))
             for a, b, c in zip(found.first, found.second, found.cosine)]
    dropped = 0
    if pairs and not slices:
        involved = sorted({i for a, b, _ in pairs for i in (a, b)})
        keys = {i: {} for i in involved}
        for column in ("file_id", "frame", "series_uid", "sop_uid"):
            for image_id, value in store.db.group_keys(involved, column).items():
                keys[image_id][column] = value
        kept = [p for p in pairs if not slice_pair(keys[p[0]], keys[p[1]])]
        dropped, pairs = len(pairs) - len(kept), kept
    found_groups = groups(pairs)
    return {"threshold": float(threshold), "slices": slices, "vectors": int(len(ids)),
            "pairs": len(pairs), "slice_pairs_left_out": dropped,
            "images_in_groups": sum(g["size"] for g in found_groups),
            "search": found.method, "groups": found_groups}
