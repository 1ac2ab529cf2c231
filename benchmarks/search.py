"""Search benchmark: index types on clustered synthetic unit vectors (d=1152).

For each index type: build seconds, bytes per vector, queries/s for single queries and for one
batch, recall@10 against exact search, and filtered recall@10 at 1% and 10% selectivity. The
FAISS rows go through `retrieval.ann.search_index`, the code path the store uses; numpy
brute force, FAISS's own IndexFlatIP search and hnswlib are baselines.

    python benchmarks/search.py --json            # 100,000 vectors
    python benchmarks/search.py --full --json     # 1,000,000 vectors (~4.6 GB of float32)
    python benchmarks/search.py --indexes "HNSW32,SQ8" --sweep 32,64,128 --json   # recall curves
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import torch  # noqa: E402

from retrieval import ann  # noqa: E402
from retrieval.ann import policy  # noqa: E402
from retrieval.ann.exact import exact_topk  # noqa: E402
from retrieval.store import new_index  # noqa: E402

K = 10


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def clustered_vectors(n: int, dim: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around random centres (as embeddings of related images cluster), plus
    held-out queries from the same distribution."""
    rng = np.random.default_rng(seed)
    clusters = max(64, n // 500)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.6, 1.2, clusters).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 65536):
            m = min(65536, count - start)
            which = rng.integers(0, clusters, m)
            noise = rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
            block = centres[which] + noise * spread[which, None] * 1.5
            out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out

    return draw(n), draw(n_queries)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth))
    return round(hits / max(1, sum(int((t >= 0).sum()) for t in truth)), 4)


def timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def qps_single(search_one, queries: np.ndarray, budget_s: float = 4.0) -> float:
    search_one(queries[0])  # warm-up
    done, start = 0, time.perf_counter()
    while done < len(queries) and (time.perf_counter() - start < budget_s or done < 5):
        search_one(queries[done])
        done += 1
    return round(done / (time.perf_counter() - start), 1)


def make_subsets(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: np.sort(rng.choice(n, max(K, int(n * frac)), replace=False)).astype(np.int64)
            for name, frac in (("filtered_recall_1pct", 0.01), ("filtered_recall_10pct", 0.10))}


def sweep_rows(set_ef, search_one, search_all, queries: np.ndarray, truth: np.ndarray,
               settings: tuple[int, ...], name: str = "ef_search") -> list[dict]:
    """Recall and speed at several efSearch (or nprobe) values of one built index, so two
    libraries can be compared at equal recall without rebuilding (a 1M-vector graph takes an
    hour here)."""
    out = []
    for value in settings:
        set_ef(value)
        out.append({name: value, "recall_at_10": recall(search_all(), truth),
                    "qps_single": qps_single(search_one, queries),
                    "qps_batch": round(len(queries) / timed(search_all, 2), 1)})
        log(f"    {name} {value}: {out[-1]}")
    return out


def faiss_row(name: str, x: np.ndarray, queries: np.ndarray, truth: np.ndarray,
              subsets: dict, subset_truth: dict, rerank: int = 0,
              sweep: tuple[int, ...] = (), sweep_nprobe: tuple[int, ...] = ()) -> dict:
    """One FAISS index type through the store's search path (ids = row numbers)."""
    n, dim = x.shape
    ids = np.arange(n, dtype=np.int64)
    index = ann.configure(new_index(name, dim))
    start = time.perf_counter()
    if not index.is_trained:
        index.train(ann.training_sample(x))  # as the store trains
    for s in range(0, n, 100_000):
        index.add_with_ids(x[s:s + 100_000], ids[s:s + 100_000])
    build_s = time.perf_counter() - start
    fetch = (lambda wanted: x[wanted])  # the store reads these from SQLite
    size = faiss.serialize_index(index).nbytes if n <= 2_000_000 else None
    search = (lambda q, **kw: ann.search_index(index, q, K, fetch_vectors=fetch,
                                               rerank=rerank, **kw))
    row = {"index": name, "build_s": round(build_s, 2),
           "bytes_per_vector": round(size / n, 1) if size else
           round(ann.estimated_bytes_per_vector(name, dim), 1)}
    row["qps_single"] = qps_single(lambda q: search(q[None]), queries)
    _, found = search(queries)
    row["qps_batch"] = round(len(queries) / timed(lambda: search(queries), 2), 1)
    row["recall_at_10"] = recall(found, truth)
    for key, allowed in subsets.items():
        _, found = search(queries, allowed=allowed)
        row[key] = recall(found, subset_truth[key])
    if rerank:
        row["rerank"] = rerank
    base = ann.inner_index(index)
    if sweep and isinstance(base, faiss.IndexHNSW):
        default_ef = base.hnsw.efSearch
        row["sweep"] = sweep_rows(lambda ef: setattr(base.hnsw, "efSearch", ef),
                                  lambda q: search(q[None]), lambda: search(queries)[1],
                                  queries, truth, sweep)
        base.hnsw.efSearch = default_ef
    if sweep_nprobe and isinstance(base, faiss.IndexIVF):
        row["sweep"] = sweep_rows(lambda n: setattr(base, "nprobe", n),
                                  lambda q: search(q[None]), lambda: search(queries)[1],
                                  queries, truth, sweep_nprobe, "nprobe")
        base.nprobe = policy.IVF_NPROBE
    del index, base
    gc.collect()
    return row


def numpy_row(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, subsets: dict,
              subset_truth: dict) -> dict:
    """What rclip-style brute force does: one matmul and argpartition."""
    def search(q: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        data = x if rows is None else x[rows]
        scores = q @ data.T
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        best = np.take_along_axis(top, order, 1)
        return best if rows is None else rows[best]

    row = {"index": "numpy", "build_s": 0.0, "bytes_per_vector": float(x.shape[1] * 4)}
    row["qps_single"] = qps_single(lambda q: search(q[None]), queries)
    row["qps_batch"] = round(len(queries) / timed(lambda: search(queries), 2), 1)
    row["recall_at_10"] = recall(search(queries), truth)
    for key, allowed in subsets.items():
        row[key] = recall(search(queries, allowed), subset_truth[key])
    return row


def faiss_flat_row(x: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    """FAISS's own IndexFlatIP search, to show what the exact path replaces."""
    index = faiss.IndexFlatIP(x.shape[1])
    start = time.perf_counter()
    index.add(x)
    row = {"index": "IndexFlatIP (faiss search)", "build_s": round(time.perf_counter() - start, 2),
           "bytes_per_vector": float(x.shape[1] * 4)}
    row["qps_single"] = qps_single(lambda q: index.search(q[None], K), queries)
    row["qps_batch"] = round(len(queries) / timed(lambda: index.search(queries, K), 1), 1)
    row["recall_at_10"] = recall(index.search(queries, K)[1], truth)
    del index
    return row


def hnswlib_row(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, subsets: dict,
                subset_truth: dict, threads: int, sweep: tuple[int, ...] = ()) -> dict | None:
    try:
        import hnswlib
    except ImportError:
        log("hnswlib is not installed: `pip install hnswlib` for its baseline row")
        return None
    n, dim = x.shape
    index = hnswlib.Index(space="ip", dim=dim)
    start = time.perf_counter()
    index.init_index(max_elements=n, M=policy.HNSW_M,
                     ef_construction=policy.HNSW_EF_CONSTRUCTION)
    index.add_items(x, np.arange(n), num_threads=threads)
    build_s = time.perf_counter() - start
    index.set_ef(policy.HNSW_EF_SEARCH)
    with tempfile.TemporaryDirectory() as tmp:
        index.save_index(f"{tmp}/h.bin")
        size = os.path.getsize(f"{tmp}/h.bin")
    row = {"index": "hnswlib", "build_s": round(build_s, 2), "bytes_per_vector": round(size / n, 1)}
    row["qps_single"] = qps_single(lambda q: index.knn_query(q[None], K, num_threads=1), queries)
    row["qps_batch"] = round(len(queries) / timed(
        lambda: index.knn_query(queries, K, num_threads=threads), 2), 1)
    row["recall_at_10"] = recall(index.knn_query(queries, K, num_threads=threads)[0].astype(np.int64), truth)
    for key, allowed in subsets.items():
        members = np.zeros(n, bool)
        members[allowed] = True
        # the same widening rule as the FAISS graph gets
        index.set_ef(ann.widened_ef(policy.HNSW_EF_SEARCH, K, allowed.size / n))
        labels, _ = index.knn_query(queries, K, num_threads=1, filter=lambda i: bool(members[i]))
        row[key] = recall(labels.astype(np.int64), subset_truth[key])
        index.set_ef(policy.HNSW_EF_SEARCH)
    if sweep:
        row["sweep"] = sweep_rows(
            index.set_ef, lambda q: index.knn_query(q[None], K, num_threads=1),
            lambda: index.knn_query(queries, K, num_threads=threads)[0].astype(np.int64),
            queries, truth, sweep)
    del index
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--full", action="store_true", help="1,000,000 vectors")
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--indexes", default="",
                        help="comma-free list separated by ';' of FAISS types (default: a set by size)")
    parser.add_argument("--skip-hnswlib", action="store_true")
    parser.add_argument("--skip-brute-force", action="store_true",
                        help="leave out the numpy and FAISS IndexFlatIP baseline rows")
    parser.add_argument("--sweep", default="",
                        help="comma-separated efSearch values: recall/speed of the HNSW rows "
                             "and hnswlib at each (e.g. 16,24,32,48,64,96,128)")
    parser.add_argument("--sweep-nprobe", default="",
                        help="comma-separated nprobe values for the IVF rows (e.g. 4,8,16,32)")
    parser.add_argument("--min-prob", action="store_true",
                        help="only the min-prob section (benchmarks/min_prob.py): recall of the "
                             "widened index search for all vectors above a threshold")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.min_prob:
        return min_prob_section(args)
    n = 1_000_000 if args.full else args.n
    sweep = tuple(int(v) for v in args.sweep.split(",") if v)
    sweep_nprobe = tuple(int(v) for v in args.sweep_nprobe.split(",") if v)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    log(f"generating {n}×{args.dim} clustered unit vectors ({n * args.dim * 4 / 2**30:.2f} GiB)")
    x, queries = clustered_vectors(n, args.dim, args.queries)
    _, truth = exact_topk(queries, x, None, K)
    subsets = make_subsets(n)
    subset_truth = {key: exact_topk(queries, x[rows], rows, K)[1] for key, rows in subsets.items()}
    choice = ann.choose_index(n, args.dim)
    nlist = ann.ivf_lists(n)
    types = [t for t in args.indexes.split(";") if t] or [
        "Flat", "HNSW32", "HNSW32,SQ8", f"IVF{nlist},Flat", f"IVF{nlist},SQ8"]
    if choice.index_type not in types:
        types.append(choice.index_type)

    rows = []
    for name in types:
        log(f"{name} …")
        rerank = choice.rerank if name == choice.index_type else 0
        rows.append(faiss_row(name, x, queries, truth, subsets, subset_truth, rerank, sweep,
                              sweep_nprobe))
        log(f"  {rows[-1]}")
    if not args.skip_brute_force:
        log("numpy …")
        rows.append(numpy_row(x, queries, truth, subsets, subset_truth))
        log(f"  {rows[-1]}")
        log("faiss IndexFlatIP …")
        rows.append(faiss_flat_row(x, queries, truth))
        log(f"  {rows[-1]}")
    if not args.skip_hnswlib:
        log("hnswlib …")
        row = hnswlib_row(x, queries, truth, subsets, subset_truth, args.threads, sweep)
        if row:
            rows.append(row)
            log(f"  {rows[-1]}")
    doc = {"n": n, "dim": args.dim, "default_index": choice.index_type,
           "default_reason": choice.reason, "queries": args.queries, "k": K,
           "threads": args.threads, "machine": machine(), "rows": rows}
    if args.json:
        print(json.dumps(doc))
    else:
        print(table(doc))
    return doc


def min_prob_section(args) -> dict:
    """Recall of --min-prob's index path against the exact set, on a store of planted vectors."""
    import min_prob

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    x, queries = clustered_vectors(args.n, args.dim, min(args.queries, 20))
    types = [t for t in args.indexes.split(";") if t] or ["HNSW32", "HNSW32,SQ8", "Flat"]
    log(f"min-prob over {args.n}×{args.dim} planted vectors: {types}")
    doc = {"section": "min_prob", "n": args.n, "dim": args.dim, "queries": len(queries),
           "page": min_prob.PAGE, "threads": args.threads, "machine": machine(),
           "cpu_flags": cpu_flags(), **min_prob.run(x, queries, types, log)}
    print(json.dumps(doc) if args.json else "\n".join(map(str, doc["rows"])))
    return doc


def cpu_flags() -> list[str]:
    """The vector instruction sets FAISS and BLAS can use here."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in {"avx", "avx2", "fma", "avx512f", "avx512bw",
                                             "avx512_vnni", "amx_tile", "neon", "sve"})


def machine() -> str:
    import platform

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu or platform.processor()}, {os.cpu_count()} cores, torch {torch.__version__}, faiss {faiss.__version__}"


def table(doc: dict) -> str:
    cols = ["index", "build_s", "bytes_per_vector", "qps_single", "qps_batch", "recall_at_10",
            "filtered_recall_1pct", "filtered_recall_10pct"]
    lines = [f"n={doc['n']} dim={doc['dim']} default={doc['default_index']} ({doc['default_reason']})",
             " | ".join(cols)]
    for row in doc["rows"]:
        lines.append(" | ".join(str(row.get(c, "")) for c in cols))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
