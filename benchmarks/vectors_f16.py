"""Raw vectors as float16: fidelity to float32, bytes per vector, re-ranking agreement.

Measures (JSON on stdout): the min cos between the stored (float16) and the float32 vector for
synthetic unit vectors (d=1152) and for real embeddings of the tiny test model; bytes per
vector as a blob and per image in a real store's database (float32 blobs at 4 KB pages, as
stores were before the float16 migration (0003), vs float16 at the 16 KB pages new stores get); and top-10 agreement of
an IVF-PQ index re-ranked from the stored float16 vectors vs from the float32 originals.

    python benchmarks/vectors_f16.py --n 20000 > benchmarks/results/float16_vectors.json
"""

from __future__ import annotations

import argparse
import json
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


def store_bytes_per_vector(x: np.ndarray, dtype: str, page_size: int) -> float:
    """Database bytes per image of a real store written through Store.writer (files, images
    and vectors tables), with the blob encoding and SQLite page size given (the float32
    variants are how stores were written before the float16 migration (0003))."""
    from unittest import mock

    from retrieval.store import Manifest, NewFile, NewImage, Store, database

    encode = blobs.encode if dtype == "float16" else (lambda v: [r.tobytes() for r in
                                                                  np.asarray(v, np.float32)])
    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.object(blobs, "encode", encode), \
            mock.patch.object(database, "SQLITE_PAGE_SIZE", page_size):
        root = Path(tmp) / "s"
        store = Store.create(root, Manifest(model="m", model_revision="-", model_fingerprint="f",
                                            dim=x.shape[1], preprocessing_version="v1"))
        for at in range(0, len(x), 1000):
            with store.writer() as w:
                w.add_files([NewFile(f"/archive/{i:07d}.dcm", 1, 0, f"{i:040x}", "dicom",
                                     [NewImage(0, 512, 512, x[i], {"modality": "CT"})])
                             for i in range(at, min(at + 1000, len(x)))])
        store.db.checkpoint()
        size = sum(p.stat().st_size for p in root.glob("meta.sqlite*"))
        store.close()
    return size / len(x)


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
        "store_database_bytes_per_image": {
            "float32_4k_pages (stores before 0003)": store_bytes_per_vector(sample, "float32", 4096),
            "float16_4k_pages (a store migrated in place keeps 4 KB pages)":
                store_bytes_per_vector(sample, "float16", 4096),
            "float16_16k_pages (new stores)": store_bytes_per_vector(sample, "float16", 16384),
            "float32_16k_pages": store_bytes_per_vector(sample, "float32", 16384)},
    }
    log("re-ranking")
    nlist = max(16, int(4 * np.sqrt(args.n)))
    result["rerank"] = rerank_agreement(x, queries, f"IVF{nlist},PQ{args.dim // 16}x4")
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
