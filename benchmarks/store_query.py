"""Query latency through a real store: SQLite filters + the FAISS index + metadata rows.

`search.py` measures index types in memory; this measures what `medsearch search` does after
the query vector exists: the metadata filter in SQLite, the search (exact over the selected
rows when few match, which reads their raw vectors), and the result rows with metadata. A store
of ``--n`` synthetic vectors (the clustered vectors of search.py) is written through
`Store.writer`, with modality ``MG`` on 1% of the rows, ``CT`` on 10% and ``CR`` on the rest.

    python benchmarks/store_query.py --json            # 100,000 vectors, automatic index
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.search import K, clustered_vectors, log, recall  # noqa: E402
from retrieval.ann.exact import exact_topk  # noqa: E402
from retrieval.filters import Filters  # noqa: E402
from retrieval.model.preprocess import PREPROCESSING_VERSION  # noqa: E402
from retrieval.store import Manifest, NewFile, NewImage, Store  # noqa: E402

SELECTIONS = {"none": None, "10pct": "CT", "1pct": "MG"}


def modality_of(n: int, seed: int = 3) -> np.ndarray:
    draw = np.random.default_rng(seed).random(n)
    return np.where(draw < 0.01, "MG", np.where(draw < 0.11, "CT", "CR"))


def build_store(root: Path, x: np.ndarray, modalities: np.ndarray, index_type: str) -> tuple[Store, np.ndarray]:
    manifest = Manifest(model="synthetic", model_revision="-", model_fingerprint="synthetic",
                        dim=x.shape[1], preprocessing_version=PREPROCESSING_VERSION,
                        index_type=index_type)
    store = Store.create(root, manifest)
    ids = []
    for start in range(0, len(x), 2000):
        with store.writer() as writer:
            for image_ids in writer.add_files([
                    NewFile(f"/archive/{i:07d}.dcm", 1, 0, f"{i:040x}", "dicom",
                            [NewImage(0, 512, 512, x[i], {"modality": str(modalities[i])})])
                    for i in range(start, min(start + 2000, len(x)))]):
                ids += image_ids
    store.maintain_index()  # an automatic store picks its index type for the final count here
    store.save()
    return store, np.asarray(ids, np.int64)


def latency(fn, queries: np.ndarray) -> dict:
    fn(queries[0])
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - start)
    return {"p50_ms": round(1000 * statistics.median(times), 2),
            "p90_ms": round(1000 * float(np.percentile(times, 90)), 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--index-type", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    x, queries = clustered_vectors(args.n, 1152, args.queries)
    modalities = modality_of(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        log(f"writing a store of {args.n} vectors …")
        store, ids = build_store(Path(tmp) / "store", x, modalities, args.index_type)
        build_s = time.perf_counter() - start
        log(f"  {build_s:.1f} s, index {store.manifest.index_type}")
        rows = []
        for name, modality in SELECTIONS.items():
            filters = Filters(modality=[modality]) if modality else None
            members = np.flatnonzero(modalities == modality) if modality else np.arange(args.n)
            _, truth = exact_topk(queries, x[members], ids[members], K)
            found = np.stack([store.search(q[None], K, filters)[1][0] for q in queries])

            def query(q: np.ndarray) -> None:
                _, hits = store.search(q[None], K, filters)
                store.rows([int(i) for i in hits[0] if i >= 0])

            rows.append({"filter": name, "matching": int(members.size),
                         "recall_at_10": recall(found, truth),
                         "search_only": latency(lambda q: store.search(q[None], K, filters), queries),
                         "search_and_rows": latency(query, queries)})
            log(f"  {rows[-1]}")
        doc = {"n": args.n, "index": store.manifest.index_type, "store_build_s": round(build_s, 1),
               "k": K, "rows": rows}
        store.close()
    print(json.dumps(doc) if args.json else json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
