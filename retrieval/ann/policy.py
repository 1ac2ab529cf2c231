"""Which FAISS index a store should use, how it is set up, and when it is (re)trained.

The rules come from `benchmarks/search.py` on the 2-core reference machine (d=1152, unit
vectors, k=10); see benchmarks/README.md for the figures:

* exact (``Flat``) while one query's full scan stays short: it reads n·d·4 bytes per query
  (≈ 40 ms at 100k×1152 on ~10 GB/s), so beyond ~20k vectors a graph answers far faster;
* ``HNSW32,SQ8`` (graph over 8-bit codes, ~1.4 KB/vector at d=1152) up to 300k vectors: at
  100k the highest queries/s of all rows with recall@10 ≥ 0.95 (0.979), ahead of HNSW32 over
  float32, IVF and hnswlib, at under a third of the memory; 0.968 at 300k;
* ``IVF{nlist}_HNSW32,SQ8`` beyond: at 1M the graph's recall fell to 0.80 (0.94 even at
  efSearch 192; hnswlib 0.83 / 0.95) while 4096 lists with 8 probed kept 0.981 at ~1.2
  KB/vector, 497 / 1432 q/s (single / batch) — above hnswlib at any recall it reached. The
  graph over the 4096 centroids matters: with a flat list quantizer each query scanned every
  centroid and single queries ran at ~270 q/s whatever nprobe;
* ``IVF{nlist}_HNSW32,PQ{m}x8`` for tens of millions or a tight budget, with exact re-ranking
  of the candidates from the raw vectors the store keeps in SQLite.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import faiss
import numpy as np

AUTO = "auto"
#: Exact search while one query scans at most this many bytes of raw vectors (~10 ms).
EXACT_MAX_BYTES = 96 * 1024 * 1024
#: Graph indexes up to this many vectors; beyond, their recall at the default efSearch drops
#: (search benchmark: 0.979 at 100k, 0.968 at 300k, 0.80 at 1M) and IVF keeps it.
GRAPH_MAX_VECTORS = 300_000
#: Beyond this many vectors (or when SQ8 does not fit), PQ codes with exact re-ranking.
PQ_MIN_VECTORS = 20_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
IVF_NPROBE = 8  # 1M benchmark: recall@10 0.981 at 4 to 16 probes; 8 leaves a margin
RERANK_FACTOR = 4
#: Vectors IVF/PQ training sees at most (64 per list at 4096 lists).
TRAIN_SAMPLE = 256 * 1024
#: k-means wants this many training vectors per centroid (FAISS warns below it).
TRAIN_PER_CENTROID = 39
#: An 8-bit scalar quantizer learns each dimension's range; from fewer vectors it clips.
SQ_MIN_TRAIN = 1_000


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS factory string with the reason it was chosen, as stored in the manifest."""

    index_type: str
    reason: str
    exact: bool
    bytes_per_vector: float
    rerank: int = 0          # re-rank this many × k candidates exactly (0 = no re-ranking)

    def to_json(self) -> dict:
        return asdict(self)


def rerank_for(index_type: str) -> int:
    """Candidates per result re-scored exactly: PQ codes lose too much to rank by alone."""
    return RERANK_FACTOR if re.search(r",PQ\d", index_type.replace(" ", "")) else 0


def default_memory_budget() -> int:
    """Half of the machine's physical memory: the index must leave room for everything else."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def ivf_lists(n: int) -> int:
    """About 4·√n inverted lists, a power of two (stable between rebuilds of similar size)."""
    target = 4 * math.sqrt(max(n, 1))
    return int(max(16, min(65536, 2 ** round(math.log2(target)))))


def estimated_bytes_per_vector(index_type: str, dim: int) -> float:
    """Memory per vector of a factory string (codes + graph links + ids), for the budget."""
    spec = index_type.replace(" ", "")
    per = 16.0  # IndexIDMap2: id array + reverse map
    storage = spec.split(",")[-1]
    if storage == "Flat" or storage.startswith("HNSW") and "," not in spec:
        per += 4 * dim
    elif storage == "SQ8":
        per += dim
    elif storage in ("SQfp16", "SQ16"):
        per += 2 * dim
    elif m := re.match(r"PQ(\d+)(?:x(\d+))?", storage):
        per += int(m.group(1)) * int(m.group(2) or 8) / 8
    else:
        per += 4 * dim
    if hnsw := re.match(r"HNSW(\d+)", spec):
        per += int(hnsw.group(1)) * 2 * 4 * 1.1  # level-0 links plus the upper levels
    if spec.startswith("IVF"):
        per += 16  # inverted-list ids and the direct map (id → list, offset)
    return per


def choose_index(n: int, dim: int, memory_budget: int | None = None) -> IndexChoice:
    """The index type for ``n`` vectors of ``dim`` within ``memory_budget`` bytes."""
    budget = memory_budget or default_memory_budget()
    n = max(0, int(n))
    raw = n * dim * 4
    gib = budget / 2**30
    if raw <= EXACT_MAX_BYTES:
        return IndexChoice("Flat", f"{n} vectors: an exact scan reads {raw / 2**20:.0f} MiB per "
                           f"query (≤ {EXACT_MAX_BYTES >> 20} MiB), fast enough and exact", True,
                           estimated_bytes_per_vector("Flat", dim))
    candidates: list[tuple[str, str, int]] = []
    if n <= GRAPH_MAX_VECTORS:
        candidates.append((f"HNSW{HNSW_M},SQ8", f"{n} vectors: graph over 8-bit codes, the "
                           "fastest at recall@10 ≥ 0.95 in the search benchmark", 0))
    if n < PQ_MIN_VECTORS:
        nlist = ivf_lists(n)
        candidates.append((f"IVF{nlist}_HNSW32,SQ8", f"{n} vectors: inverted lists with "
                           "8-bit codes and a graph over the list centroids, which keep "
                           "recall@10 ≥ 0.95 beyond the size where a graph over the vectors "
                           "loses it (search benchmark at 1M)", 0))
    nlist = ivf_lists(n)
    m = max(8, dim // 16)
    while dim % m:
        m -= 1
    candidates.append((f"IVF{nlist}_HNSW32,PQ{m}x8", f"{n} vectors: product-quantised codes "
                       f"with exact re-ranking of {RERANK_FACTOR}·k candidates from the stored "
                       "raw vectors", RERANK_FACTOR))
    for index_type, why, rerank in candidates:
        per = estimated_bytes_per_vector(index_type, dim)
        if per * n <= budget:
            return IndexChoice(index_type, f"{why}; ~{per * n / 2**30:.2f} GiB of "
                               f"{gib:.1f} GiB budget", False, per, rerank)
    index_type, why, rerank = candidates[-1]
    per = estimated_bytes_per_vector(index_type, dim)
    return IndexChoice(index_type, f"{why}; ~{per * n / 2**30:.2f} GiB exceeds the "
                       f"{gib:.1f} GiB budget, but nothing smaller keeps recall", False, per, rerank)


def training_minimum(index_type: str) -> int:
    """Vectors a factory type needs before it can be trained well (0: none known).

    Until a store holds that many it is searched exactly (a flat index), not trained on the
    first batch: 4096 lists cannot be trained from 256 vectors at all, and lists trained on a
    few thousand stay poor for every vector added later.
    """
    spec = index_type.replace(" ", "")
    need = 0
    if ivf := re.match(r"(?:OPQ\d+[^,]*,)?IVF(\d+)", spec):
        need = TRAIN_PER_CENTROID * int(ivf.group(1))
    if codes := re.search(r"(?:PQ|RQ|LSQ)\d+(?:x(\d+))?", spec):  # codebooks of 2^bits
        need = max(need, TRAIN_PER_CENTROID * 2 ** int(codes.group(1) or 8))
    if "SQ" in spec:
        need = max(need, SQ_MIN_TRAIN)
    return need


@lru_cache(maxsize=64)
def needs_training(index_type: str, dim: int) -> bool:
    """Whether a factory type must be trained before vectors can be added."""
    return not faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT).is_trained


def retraining_due(index_type: str, trained_on: int | None, count: int) -> bool:
    """Retrain IVF/PQ once the store has doubled since training (up to :data:`TRAIN_SAMPLE`):
    centroids learnt from the first part of an archive fit it poorly once it has grown, and
    doubling keeps the total rebuild work within twice that of the last build."""
    if trained_on is None or not re.search(r"IVF|PQ|RQ|LSQ", index_type):
        return False  # a scalar quantizer's ranges settle early; unknown: an older store
    return trained_on < TRAIN_SAMPLE and count >= 2 * max(trained_on, 1)


def training_sample(vectors: np.ndarray, limit: int = TRAIN_SAMPLE) -> np.ndarray:
    """A random subset to train IVF/PQ on: k-means over every vector of a million-row store
    would take most of an hour on a few cores, for no measurable gain in recall."""
    if len(vectors) <= limit:
        return vectors
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), limit, replace=False))
    return np.ascontiguousarray(vectors[rows])


def configure(index: faiss.Index) -> faiss.Index:
    """Set build-time parameters a factory string cannot express (HNSW efConstruction)."""
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexIDMap):
        base = faiss.downcast_index(base.index)
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        base.hnsw.efSearch = HNSW_EF_SEARCH
    elif isinstance(base, faiss.IndexIVF):
        base.nprobe = IVF_NPROBE
        quantizer = faiss.downcast_index(base.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * IVF_NPROBE)
    return enable_lookup(index)


def enable_lookup(index: faiss.Index) -> faiss.Index:
    """Let an IVF index decode its codes by id (a direct map, 8 bytes per vector).

    Without it a filtered query over a small selection has to read every selected raw vector
    from SQLite (212 ms for 10k rows at 100k); with it the selection is ranked on the decoded
    codes in memory and only the best few are read. The store also calls it on load, for an
    index file written without a direct map.
    """
    for part in shard_list(index):
        base = inner_index(part)
        if isinstance(base, faiss.IndexIVF) and base.direct_map.type == faiss.DirectMap.NoMap:
            base.make_direct_map()
    return index


def inner_index(index: faiss.Index) -> faiss.Index:
    """The index inside an IndexIDMap/IDMap2 wrapper (or the index itself); for a sharded
    index, the first shard's (every shard is of one type, cut from one trained index)."""
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexShards) and base.count():
        base = faiss.downcast_index(base.at(0))
    if isinstance(base, faiss.IndexIDMap):
        return faiss.downcast_index(base.index)
    return base


# -- sharded layout: N indexes cut from ONE trained index, ids split by id % N ----------------
def shard_list(index: faiss.Index) -> list[faiss.Index]:
    """The shards of a FAISS IndexShards (each an IDMap2 holding the ids ≡ its number mod N),
    or [index] for an unsharded one. The container owns them: keep it alive while using them."""
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexShards):
        return [faiss.downcast_index(base.at(i)) for i in range(base.count())]
    return [index]


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The shard each id lives in: id % N, so membership needs no lookup table (a filter's
    ids split per shard in O(selected)) and new ids spread evenly as they are handed out."""
    return np.asarray(ids, np.int64) % max(int(shards), 1)


def split_trained(index: faiss.Index, shards: int) -> list[faiss.Index]:
    """``shards`` empty copies of an empty index that is trained (or needs no training).

    Every copy holds the same coarse quantiser and codebooks, so a query probes the same
    lists in every shard and scores are comparable across shards: merging the shards' top-k
    gives what one index over all vectors gives (exactly so for Flat and IVF over Flat/SQ
    codes). Copied through FAISS's own serialisation, which every index type supports."""
    if index.ntotal:
        raise ValueError("split_trained wants an empty index")
    data = faiss.serialize_index(index)
    return [enable_lookup(faiss.deserialize_index(data)) for _ in range(max(int(shards), 1))]


def sharded(parts: list[faiss.Index]) -> faiss.Index:
    """One index for one part, else the parts as a FAISS IndexShards (threaded, ids kept as
    given: each part is an IDMap2 holding its own ids)."""
    if len(parts) == 1:
        return parts[0]
    container = faiss.IndexShards(parts[0].d, True, False)
    for part in parts:
        container.add_shard(part)  # the Python wrapper keeps a reference to each part
    container.syncWithSubIndexes()
    return container


def add_by_shard(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add vectors under their ids, each to shard id % N (FAISS's own IndexShards.add_with_ids
    would cut the batch into contiguous runs instead)."""
    ids = np.ascontiguousarray(ids, np.int64)
    vectors = np.ascontiguousarray(vectors, np.float32)
    parts = shard_list(index)
    if len(parts) == 1:
        index.add_with_ids(vectors, ids)
        return
    where = shard_of(ids, len(parts))
    for number, part in enumerate(parts):
        mine = where == number
        if mine.any():
            part.add_with_ids(np.ascontiguousarray(vectors[mine]), ids[mine])
    faiss.downcast_index(index).syncWithSubIndexes()


def remove_by_shard(index: faiss.Index, ids: np.ndarray) -> None:
    """Remove ids from the shard each lives in (flat storage only; others hide removals)."""
    ids = np.ascontiguousarray(ids, np.int64)
    parts = shard_list(index)
    if len(parts) == 1:
        index.remove_ids(ids)
        return
    where = shard_of(ids, len(parts))
    for number, part in enumerate(parts):
        if (where == number).any():
            part.remove_ids(np.ascontiguousarray(ids[where == number]))
    faiss.downcast_index(index).syncWithSubIndexes()
