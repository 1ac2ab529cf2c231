"""Scale benchmark: the compact index at millions of vectors, with float16 raw vectors on disk.

What a store of ``--n`` images costs and answers with the index type the policy picks for tens
of millions (``IVF{nlist}_HNSW32,PQ{m}x8``, re-ranked exactly from the raw vectors): build time
(training, adding), bytes per vector (index codes; raw float16 vectors), recall@10 against an
exact scan of the same raw vectors and queries/s, at several probe counts, through
``retrieval.ann.search_index`` (the store's code path), with the raw vectors read from a
memory-mapped float16 file, so 10M vectors (23 GB) fit a 24 GB machine.

Everything is kept in ``--work`` and the run resumes where it stopped (vectors are generated in
seeded chunks, the index is saved every ``--save-every`` vectors): start it in the background
and run the same command again after an interruption.

    python benchmarks/scale.py --n 1000000 --json
    nohup python benchmarks/scale.py --n 10000000 --work /var/tmp/ms-10m --json > 10m.json &
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402

from benchmarks.machine import cpu  # noqa: E402
from benchmarks.search import K, log, recall  # noqa: E402
from retrieval import ann  # noqa: E402
from retrieval.ann import policy  # noqa: E402
from retrieval.ann.exact import exact_topk  # noqa: E402
from retrieval.store import new_index  # noqa: E402

CHUNK = 1 << 18          # vectors generated, added and scanned per step
TRUTH_K = 100


def default_index_type(n: int, dim: int) -> str:
    """The policy's compact choice for tens of millions, at this size."""
    m = max(8, dim // 16)
    while dim % m:
        m -= 1
    return f"IVF{policy.ivf_lists(n)}_HNSW32,PQ{m}x8"


class Work:
    """The run's folder: raw vectors, queries, ground truth, index and a state file."""

    def __init__(self, folder: Path, n: int, dim: int, n_queries: int, seed: int) -> None:
        self.folder, self.n, self.dim, self.seed = folder, n, dim, seed
        folder.mkdir(parents=True, exist_ok=True)
        self.state_path = folder / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        want = {"n": n, "dim": dim, "queries": n_queries, "seed": seed}
        if self.state and self.state.get("shape") != want:
            raise SystemExit(f"{folder} holds a run of {self.state.get('shape')}; use another --work")
        self.state["shape"] = want
        mode = "r+" if (folder / "vectors.f16").is_file() else "w+"
        self.vectors = np.memmap(folder / "vectors.f16", np.float16, mode, shape=(n, dim))
        rng = np.random.default_rng(seed)
        clusters = max(64, n // 500)
        self.centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        self.spread = rng.uniform(0.6, 1.2, clusters).astype(np.float32)
        self.queries = self._draw(np.random.default_rng(seed + 1), n_queries)

    def save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)

    def _draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """Unit vectors around the centres, as benchmarks/search.py draws them."""
        which = rng.integers(0, len(self.centres), count)
        noise = rng.standard_normal((count, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        block = self.centres[which] + noise * self.spread[which, None] * 1.5
        return block / np.linalg.norm(block, axis=1, keepdims=True)

    def generate(self) -> None:
        chunks = -(-self.n // CHUNK)
        for c in range(self.state.get("generated", 0), chunks):
            start, stop = c * CHUNK, min((c + 1) * CHUNK, self.n)
            self.vectors[start:stop] = self._draw(np.random.default_rng(self.seed + 100 + c),
                                                  stop - start)
            self.vectors.flush()
            self.state["generated"] = c + 1
            self.save_state()
            log(f"generated {stop:,} / {self.n:,}")

    def block(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.vectors[start:stop], np.float32)

    def fetch(self, ids: np.ndarray) -> np.ndarray:
        """Raw vectors by id (id = row), read from disk in id order, as the store re-ranks."""
        order = np.argsort(ids)
        out = np.empty((len(ids), self.dim), np.float32)
        out[order] = self.vectors[ids[order]]
        return out

    def truth(self) -> np.ndarray:
        """Exact top-100 of every query over the raw vectors, one streamed pass."""
        path = self.folder / "truth.npy"
        if path.is_file():
            return np.load(path)
        best = None
        for start in range(0, self.n, CHUNK):
            stop = min(start + CHUNK, self.n)
            found = exact_topk(self.queries, self.block(start, stop),
                               np.arange(start, stop, dtype=np.int64), TRUTH_K)
            best = found if best is None else ann.merge_topk([best, found], TRUTH_K)
        np.save(path, best[1])
        return best[1]


def build(work: Work, index_type: str, save_every: int) -> tuple[faiss.Index, dict]:
    path = work.folder / "index.faiss"
    timing = work.state.setdefault("build_s", {"train": 0.0, "add": 0.0})
    if path.is_file():
        index = policy.configure(faiss.read_index(str(path)))
    else:
        index = new_index(index_type, work.dim)
        started = time.perf_counter()
        sample_rows = np.sort(np.random.default_rng(work.seed + 2).choice(
            work.n, min(work.n, policy.TRAIN_SAMPLE), replace=False))
        index.train(work.fetch(sample_rows))
        timing["train"] = round(time.perf_counter() - started, 1)
        faiss.write_index(index, str(path))
        work.save_state()
        log(f"trained {index_type} in {timing['train']} s")
    added = int(index.ntotal)
    since_save = 0
    while added < work.n:
        stop = min(added + CHUNK, work.n)
        started = time.perf_counter()
        index.add_with_ids(work.block(added, stop), np.arange(added, stop, dtype=np.int64))
        timing["add"] = round(timing["add"] + time.perf_counter() - started, 1)
        since_save += stop - added
        added = stop
        if since_save >= save_every or added == work.n:
            tmp = path.with_suffix(".tmp")
            faiss.write_index(index, str(tmp))
            os.replace(tmp, path)
            work.save_state()
            since_save = 0
        log(f"added {added:,} / {work.n:,} ({timing['add']} s so far)")
    return index, timing


def measure(work: Work, index: faiss.Index, probes: list[int], reranks: list[int]) -> list[dict]:
    """Recall@10 and queries/s per probe count: by the codes alone, and re-ranked exactly from
    the raw vectors with ``factor``·k candidates for each factor in ``reranks``."""
    truth = work.truth()
    base = faiss.downcast_index(ann.inner_index(index))
    rows = []
    for nprobe in probes:
        base.nprobe = nprobe
        for factor in [0, *reranks]:
            started = time.perf_counter()
            _, found = ann.search_index(index, work.queries, K, fetch_vectors=work.fetch,
                                        rerank=factor)
            batch_s = time.perf_counter() - started
            singles = work.queries[:50]
            started = time.perf_counter()
            for q in singles:
                ann.search_index(index, q[None], K, fetch_vectors=work.fetch, rerank=factor)
            single_s = (time.perf_counter() - started) / len(singles)
            row = {"nprobe": nprobe, "rerank_factor": factor,
                   "recall_at_10": round(recall(found, truth[:, :K]), 4),
                   "qps_batch": round(len(work.queries) / batch_s, 1),
                   "qps_single": round(1 / single_s, 1)}
            rows.append(row)
            log(str(row))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--index-type", help="default: the policy's PQ choice for this size")
    parser.add_argument("--probes", default="8,32")
    parser.add_argument("--reranks", default="4,16,64",
                        help="candidates re-scored per result (the store uses the policy's)")
    parser.add_argument("--work", type=Path, help="default: /var/tmp/medsearch-scale-N")
    parser.add_argument("--save-every", type=int, default=2_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index_type = args.index_type or default_index_type(args.n, args.dim)
    work = Work(args.work or Path(f"/var/tmp/medsearch-scale-{args.n}"), args.n, args.dim,
                args.queries, args.seed)
    started = time.perf_counter()
    work.generate()
    generate_s = round(time.perf_counter() - started, 1)
    index, timing = build(work, index_type, args.save_every)
    codes = faiss.downcast_index(ann.inner_index(index))
    per_vector = faiss.serialize_index(index).nbytes / max(index.ntotal, 1)
    doc = {
        "n": args.n, "dim": args.dim, "queries": args.queries, "k": K,
        "index_type": index_type, "rerank_factor": policy.rerank_for(index_type),
        "train_vectors": min(args.n, policy.TRAIN_SAMPLE),
        "build_s": timing, "generate_s_this_run": generate_s,
        "index_bytes_per_vector": round(per_vector, 1),
        "pq_code_bytes": int(getattr(codes, "code_size", 0)),
        "raw_bytes_per_vector_float16": 2 * args.dim,
        "raw_bytes_per_vector_float32": 4 * args.dim,
        "truth": "exact top-10 over the same float16 raw vectors",
        "rows": measure(work, index, [int(p) for p in args.probes.split(",")],
                        [int(r) for r in args.reranks.split(",")]),
        "machine": cpu(), "threads": faiss.omp_get_max_threads(),
    }
    print(json.dumps(doc) if args.json else json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
