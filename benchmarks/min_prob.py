"""Min-prob benchmark: recall of the index path of ``--min-prob`` against the exact answer.

A min-prob query wants every image whose SigLIP probability passes P, i.e. every vector whose
cosine to the query passes the equivalent threshold (retrieval.ranking.prob_threshold). Small
stores are scanned exactly; a large one is searched through its index with k grown fourfold
until the scores fall below the threshold. This measures that widened search on a real store
(SQLite rows, the store's own index) of clustered planted vectors: for thresholds set so that
about 100, 1,000 and 5,000 vectors pass per query, the fraction of the exact set it returns
(recall), whether everything it returns passes (precision), and the milliseconds to page
through all of them 1,000 at a time (each page re-runs the widened search).

    python benchmarks/search.py --min-prob --n 50000 --json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

MATCHES = (100, 1_000, 5_000)
PAGE = 1000


def _store(root: Path, x: np.ndarray, index_type: str):
    from retrieval.store import Manifest, NewFile, NewImage, Store

    store = Store.create(root, Manifest(model="planted", model_revision="local",
                                        model_fingerprint="planted", dim=x.shape[1],
                                        preprocessing_version="planted", index_type=index_type))
    for start in range(0, len(x), 5000):
        with store.writer() as writer:
            writer.add_files([NewFile(f"/data/{i}.png", 1, 1, str(i), "image",
                                      [NewImage(0, 1, 1, x[i])])
                              for i in range(start, min(start + 5000, len(x)))])
    store.maintain_index()
    store.save()
    return store


def run(x: np.ndarray, queries: np.ndarray, index_types: list[str], log) -> dict:
    """One row per (index type, expected matches): recall, precision, seconds per query."""
    from retrieval.ranking import EXACT_SCAN_LIMIT, PageOptions, rank_page

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index_type in index_types:
            started = time.perf_counter()
            store = _store(Path(tmp) / index_type.replace(",", "_"), x, index_type)
            built = time.perf_counter() - started
            ids, stored = store.all_vectors()
            for matches in [m for m in MATCHES if m <= len(ids) // 4]:
                found_all, truth_all, seconds, precise = 0, 0, 0.0, True
                for q in queries:
                    scores = stored @ q
                    threshold = float(np.sort(scores)[-matches])
                    truth = set(ids[scores >= threshold].tolist())
                    got: set[int] = set()
                    offset: int | None = 0
                    started = time.perf_counter()
                    while offset is not None:  # paged as an export or the page would
                        opts = PageOptions(k=PAGE, offset=offset, threshold=threshold,
                                           exact_scan=True)
                        hits, more = rank_page(store, q, opts)
                        got |= {h.id for h in hits}
                        offset = offset + PAGE if more else None
                    seconds += time.perf_counter() - started
                    found_all += len(got & truth)
                    truth_all += len(truth)
                    precise &= got <= truth
                rows.append({"index": store.index_status().get("index_type", index_type),
                             "index_requested": index_type, "build_s": round(built, 2),
                             "expected_matches": matches,
                             "recall": round(found_all / max(1, truth_all), 4),
                             "precision_is_1": bool(precise),
                             "ms_per_query": round(1000 * seconds / len(queries), 1),
                             "exact_scan": len(ids) <= EXACT_SCAN_LIMIT})
                log(f"  {rows[-1]}")
            store.close()
    return {"rows": rows}
