"""Sharded against unsharded search (`medsearch reindex --shards N`) on clustered synthetic
unit vectors: for each index type, one index and N shards cut from the SAME trained index
(retrieval.ann.policy.split_trained), searched through the store's code paths
(retrieval.ann.search_index / search_shards, re-rank from the raw vectors where the type
asks for it): recall@10 against exact, agreement of the two top-10s, queries/s single and
batched. Prints one JSON document with --json."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.search import clustered_vectors  # noqa: E402
from retrieval import ann  # noqa: E402
from retrieval.ann.exact import exact_topk  # noqa: E402
from retrieval.store.vectors import new_index  # noqa: E402


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def timed_qps(search, queries: np.ndarray) -> tuple[float, float]:
    start = time.perf_counter()
    for q in queries[:50]:
        search(q[None])
    single = min(50, len(queries)) / (time.perf_counter() - start)
    start = time.perf_counter()
    search(queries)
    return single, len(queries) / (time.perf_counter() - start)


def run(n: int, dim: int, n_queries: int, shards: int, specs: list[str]) -> dict:
    x, queries = clustered_vectors(n, dim, n_queries)
    ids = np.arange(n, dtype=np.int64)
    fetch = lambda wanted: x[wanted]  # noqa: E731  (the store reads its raw vectors here)
    _, truth = exact_topk(queries, x, ids, 10)
    rows = []
    for spec in specs:
        print(f"{spec}: training", file=sys.stderr)
        start = time.perf_counter()
        empty = new_index(spec, dim)
        if not empty.is_trained:
            empty.train(ann.training_sample(x))
        trained_s = time.perf_counter() - start
        one = ann.sharded(ann.split_trained(empty, 1))
        ann.add_by_shard(one, ids, x)
        one_s = time.perf_counter() - start
        start = time.perf_counter()
        split = ann.sharded(ann.split_trained(empty, shards))
        ann.add_by_shard(split, ids, x)
        split_s = time.perf_counter() - start + trained_s
        rerank = ann.rerank_for(spec)
        plain = lambda q: ann.search_index(one, q, 10, fetch_vectors=fetch, rerank=rerank)  # noqa: E731
        parted = lambda q: ann.search_shards(split, q, 10, fetch_vectors=fetch, rerank=rerank)  # noqa: E731
        found_one, found_split = plain(queries)[1], parted(queries)[1]
        one_qps, split_qps = timed_qps(plain, queries), timed_qps(parted, queries)
        row = {"index": spec, "shards": shards, "rerank": rerank,
               "recall_at_10_unsharded": round(recall(found_one, truth), 4),
               "recall_at_10_sharded": round(recall(found_split, truth), 4),
               "top10_identical_rows": float(np.mean((found_one == found_split).all(axis=1))),
               "build_s_unsharded": round(one_s, 2), "build_s_sharded": round(split_s, 2),
               "qps_single_unsharded": round(one_qps[0], 1), "qps_single_sharded": round(split_qps[0], 1),
               "qps_batch_unsharded": round(one_qps[1], 1), "qps_batch_sharded": round(split_qps[1], 1),
               "shard_sizes": [int(p.ntotal) for p in ann.shard_list(split)]}
        row["recall_delta"] = round(row["recall_at_10_sharded"] - row["recall_at_10_unsharded"], 4)
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return {"n": n, "dim": dim, "queries": n_queries, "shards": shards, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--indexes", default="Flat;IVF256,SQ8;IVF256,PQ72x8",
                        help="index types separated by ';'")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    doc = run(args.n, args.dim, args.queries, args.shards, args.indexes.split(";"))
    print(json.dumps(doc, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
