"""Raw vectors as float16: fidelity to float32, bytes per vector, re-ranking agreement.

Measures (JSON on stdout): the min cos between the stored (float16) and the float32 vector for
synthetic unit vectors (d=1152) and for real embeddings of the tiny test model; bytes per
vector as a blob and in a store's SQLite file (float32 blobs at 4 KB pages, as stores were
before migration 0002, vs float16 at the 16 KB pages new stores get); and top-10 agreement of
an IVF-PQ index re-ranked from the stored float16 vectors vs from the float32 originals.

    python benchmarks/vectors_f16.py --n 20000 > benchmarks/results/float16_vectors.json
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.search import clustered_vectors, log  # noqa: E402
from retrieval import ann  # noqa: E402
from retrieval.store import blobs  # noqa: E402


def min_cos(x: np.ndarray) -> float:
    back = blobs.decode(blobs.encode(x), x.shape[1]).astype(np.float64)
    x = x.astype(np.float64)
    cos = (back * x).sum(1) / np.linalg.norm(back, axis=1) / np.linalg.norm(x, axis=1)
    return float(cos.min())


def tiny_model_embeddings(n: int) -> tuple[np.ndarray, int]:
    import torch

    from retrieval.model.encoders import VisionEncoder
    from retrieval.model.testmodel import make_test_model

    with tempfile.TemporaryDirectory() as tmp:
        encoder = VisionEncoder.load(str(make_test_model(Path(tmp) / "tiny")), device="cpu",
                                     precision="fp32")
        size = encoder.image_size
        rng = np.random.default_rng(0)
        out = [encoder.embed_batch(torch.from_numpy(
            rng.uniform(-1, 1, (16, 3, size, size)).astype(np.float32))) for _ in range(n // 16)]
    return np.concatenate(out), encoder.dim


def sqlite_bytes_per_vector(x: np.ndarray, dtype: str, page_size: int) -> float:
    """File bytes per row of the store's vectors table layout (image_id, blob)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.sqlite"
        con = sqlite3.connect(path)
        con.execute(f"PRAGMA page_size={page_size}")
        con.execute("CREATE TABLE vectors (image_id INTEGER PRIMARY KEY, vector BLOB NOT NULL)")
        encoded = blobs.encode(x) if dtype == "float16" else [v.tobytes() for v in x]
        con.executemany("INSERT INTO vectors VALUES (?, ?)", enumerate(encoded, 1))
        con.commit()
        con.close()
        return os.path.getsize(path) / len(x)


def rerank_agreement(x: np.ndarray, queries: np.ndarray, spec: str) -> dict:
    import faiss

    index = faiss.IndexIDMap2(faiss.index_factory(x.shape[1], spec, faiss.METRIC_INNER_PRODUCT))
    index.train(ann.training_sample(x))
    ids = np.arange(len(x), dtype=np.int64)
    index.add_with_ids(x, ids)
    faiss.extract_index_ivf(index).nprobe = 16
    stored = blobs.decode(blobs.encode(x), x.shape[1])
    _, f32 = ann.search_index(index, queries, 10, fetch_vectors=lambda i: x[i], rerank=10)
    _, f16 = ann.search_index(index, queries, 10, fetch_vectors=lambda i: stored[i], rerank=10)
    _, truth = ann.exact_topk(queries, x, None, 10)
    return {"index": spec, "queries": len(queries),
            "same_top10_ordered": float(np.mean((f16 == f32).all(axis=1))),
            "same_top10_set": float(np.mean([set(a) == set(b) for a, b in zip(f16, f32)])),
            "recall10_fp32_rerank": float(np.mean([len(set(a) & set(t)) / 10
                                                   for a, t in zip(f32, truth)])),
            "recall10_fp16_rerank": float(np.mean([len(set(a) & set(t)) / 10
                                                   for a, t in zip(f16, truth)]))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=1152)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    x, queries = clustered_vectors(args.n, args.dim, args.queries)
    log("fidelity")
    rng = np.random.default_rng(1)
    gauss = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    gauss /= np.linalg.norm(gauss, axis=1, keepdims=True)
    tiny, tiny_dim = tiny_model_embeddings(256)
    log("bytes per vector")
    sample = x[:5000]
    result = {
        "n": args.n, "dim": args.dim,
        "min_cos": {"synthetic_gaussian_unit": min_cos(gauss),
                    "synthetic_clustered_unit": min_cos(x),
                    f"tiny_model_embeddings_d{tiny_dim}_n{len(tiny)}": min_cos(tiny)},
        "blob_bytes_per_vector": {"float32": 4 * args.dim, "float16": blobs.blob_size(args.dim)},
        "sqlite_file_bytes_per_vector": {
            "float32_4k_pages (stores before 0002)": sqlite_bytes_per_vector(sample, "float32", 4096),
            "float16_4k_pages (migrated store, rows rewritten in place)":
                sqlite_bytes_per_vector(sample, "float16", 4096),
            "float16_16k_pages (new stores)": sqlite_bytes_per_vector(sample, "float16", 16384),
            "float32_16k_pages": sqlite_bytes_per_vector(sample, "float32", 16384)},
    }
    log("re-ranking")
    nlist = max(16, int(4 * np.sqrt(args.n)))
    result["rerank"] = rerank_agreement(x, queries, f"IVF{nlist},PQ{args.dim // 16}x4")
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
