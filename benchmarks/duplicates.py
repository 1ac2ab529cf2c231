"""Near-duplicate search benchmark: planted copies among clustered synthetic unit vectors
(d=1152), found by `retrieval.duplicates.near_pairs` — the code path `medsearch duplicates`
runs over a store's raw vectors.

Prints seconds, recall of the planted pairs, and pairs found that were not planted (distinct
images drawn around shared centres, so neighbours are close but never copies: any such pair is
a false pair), with the machine.

    python benchmarks/duplicates.py --json                 # 100,000 vectors, 500 copies
    python benchmarks/duplicates.py --n 1000000 --json     # ~9 GB of float32 during the run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from benchmarks.machine import cpu  # noqa: E402
from retrieval.duplicates import near_pairs  # noqa: E402


def corpus(n: int, copies: int, dim: int, seed: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """``n`` unit vectors around n/500 centres, the last ``copies`` of them near-copies
    (cosine ~0.99-0.999) of earlier ones."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(64, n // 500), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    distinct = n - copies
    for start in range(0, distinct, 65536):
        stop = min(start + 65536, distinct)
        which = rng.integers(0, len(centres), stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) / np.sqrt(dim)
        block = centres[which] + noise * 1.2
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    sources = rng.choice(distinct, copies, replace=False)
    noise = rng.standard_normal((copies, dim), dtype=np.float32) * rng.uniform(
        0.001, 0.003, (copies, 1)).astype(np.float32)
    near = out[sources] + noise
    out[distinct:] = near / np.linalg.norm(near, axis=1, keepdims=True)
    return out, {(int(s), distinct + j) for j, s in enumerate(sources)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--threshold", type=float, default=0.98)
    parser.add_argument("--exact", action="store_true", help="compare every pair (flat)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    vectors, planted = corpus(args.n, args.copies, args.dim, seed=0)
    started = time.perf_counter()
    found = near_pairs(vectors, args.threshold, exact=True if args.exact else None)
    seconds = time.perf_counter() - started
    pairs = {(int(a), int(b)) for a, b in zip(found.first, found.second)}
    result = {"benchmark": "duplicates", "n": args.n, "dim": args.dim,
              "planted_pairs": len(planted), "threshold": args.threshold,
              "search": found.method, "seconds": round(seconds, 2),
              "recall_planted": round(len(pairs & planted) / len(planted), 4),
              "false_pairs": len(pairs - planted), "threads": faiss.omp_get_max_threads(),
              "machine": cpu()}
    print(json.dumps(result, indent=None if args.json else 1))
    return result


if __name__ == "__main__":
    main()
