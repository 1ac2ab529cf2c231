"""Load benchmark for `medsearch serve`: concurrent clients drive POST /search on loopback.

Starts the real CLI server (`medsearch serve`) in a subprocess on a free 127.0.0.1 port, then
for each client count runs that many closed-loop clients (each sends its next request when the
last answered) for a bounded time and request count, and reports p50/p95/p99 latency,
throughput and errors as one JSON document. Target: no errors, p95 ≤ 2× p50 at 8 clients.

Without --store it builds a synthetic store: the tiny test model (so the text tower costs
little and the service itself is measured) and N random unit vectors with varied metadata.
With --store DIR (and the model it was built with) it measures a real store.

    python benchmarks/serve.py --json                       # 1, 4, 8 clients, 20 s each
    python benchmarks/serve.py --clients 8 --seconds 60 --vectors 100000 --json
    python benchmarks/serve.py --store ./store --clients 8 --distinct --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERIES = [
    "pleural effusion", "left pneumothorax", "cardiomegaly", "consolidation right lower lobe",
    "pulmonary edema", "rib fracture", "nodule in the right upper lobe", "atelectasis",
    "melanoma on the back", "diabetic retinopathy", "normal chest radiograph", "chest tube",
    '"pleural effusion" - "chest tube"', '2:"cardiomegaly" + "edema"', "support devices",
    "hiatal hernia",
]
MODALITIES = ["CR", "DX", "CT", "MR", "US", None]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def synthetic_store(folder: Path, vectors: int, seed: int = 0) -> tuple[Path, Path]:
    """A tiny-model store holding ``vectors`` random unit vectors with varied metadata.

    Rows go in through the store's writer in one transaction (its set-based inserts), and the
    index follows them as in an index run.
    """
    from retrieval.model import VisionEncoder
    from retrieval.store import NewFile, NewImage, Store, manifest_for
    from retrieval.model.testmodel import make_test_model

    model = make_test_model(folder / "tiny-siglip")
    encoder = VisionEncoder.load(str(model), "cpu")
    store = Store.create(folder / "store", manifest_for(encoder, "Flat"))
    rng = np.random.default_rng(seed)
    block = rng.normal(size=(vectors, encoder.dim)).astype(np.float32)
    block /= np.linalg.norm(block, axis=1, keepdims=True)
    with store.writer() as writer:
        writer.add_files([
            NewFile(f"/synthetic/{i:07d}.png", 1, 0, f"{i:040x}", "image",
                    [NewImage(0, 448, 448, block[i - 1],
                              {"modality": MODALITIES[i % len(MODALITIES)],
                               "study_date": f"20{10 + i % 15:02d}{1 + i % 12:02d}15"})])
            for i in range(1, vectors + 1)])
    store.save()
    store.close()
    return folder / "store", model


def start_server(store: Path, model: str | None, port: int) -> subprocess.Popen:
    import httpx

    command = [str(Path(sys.executable).parent / "medsearch"), "serve", "--store", str(store),
               "--port", str(port), "--log-level", "warning"]
    if model:
        command += ["--model", model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.kill()
    raise SystemExit("server did not start within 300 s")


def run_load(url: str, clients: int, seconds: float, max_requests: int, k: int,
             distinct: bool, filtered: bool) -> dict:
    """``clients`` closed-loop clients for at most ``seconds`` and ``max_requests`` in all."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    issued = [0]
    stop_at = time.monotonic() + seconds
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            barrier.wait()
            n = 0
            while time.monotonic() < stop_at:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                query = QUERIES[(index + n * clients) % len(QUERIES)]
                if distinct:
                    query = f"{query} {index}-{n}"
                body = {"query": query, "k": k}
                if filtered and n % 2:
                    body["filters"] = {"modality": ["CR", "DX"]}
                n += 1
                started = time.perf_counter()
                try:
                    response = http.post("/search", json=body)
                    status = response.status_code
                    ok = status == 200 and len(response.json()["results"]) > 0
                except httpx.HTTPError as exc:
                    status, ok = type(exc).__name__, False
                elapsed = time.perf_counter() - started
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    ms = np.asarray(latencies) * 1000
    p50 = float(np.percentile(ms, 50)) if ms.size else None
    p95 = float(np.percentile(ms, 95)) if ms.size else None
    return {
        "clients": clients, "requests": int(ms.size + sum(errors.values())), "ok": int(ms.size),
        "errors": errors, "seconds": round(wall, 2),
        "throughput_rps": round(ms.size / wall, 1) if wall else None,
        "latency_ms": {"p50": _r(p50), "p95": _r(p95),
                       "p99": _r(float(np.percentile(ms, 99))) if ms.size else None,
                       "mean": _r(float(ms.mean())) if ms.size else None,
                       "max": _r(float(ms.max())) if ms.size else None},
        "p95_over_p50": round(p95 / p50, 2) if p50 else None,
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an existing store (default: synthetic)")
    parser.add_argument("--model", help="checkpoint of --store (default: the store's own)")
    parser.add_argument("--vectors", type=int, default=20000, help="synthetic store size")
    parser.add_argument("--clients", default="1,4,8", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="time per client count")
    parser.add_argument("--max-requests", type=int, default=20000, help="cap per client count")
    parser.add_argument("--warmup", type=int, default=40, help="requests before measuring")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--distinct", action="store_true",
                        help="make every query text unique (no text-embedding cache hits)")
    parser.add_argument("--filtered", action="store_true",
                        help="every other request filters by modality")
    parser.add_argument("--json", action="store_true", help="print only the JSON document")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="medsearch-bench-") as tmp:
        model = args.model
        if args.store is None:
            log(f"building a synthetic store of {args.vectors} vectors …")
            store, tiny = synthetic_store(Path(tmp), args.vectors)
            model = model or str(tiny)
        else:
            store = args.store
        port = free_port()
        log(f"starting medsearch serve on 127.0.0.1:{port} …")
        server = start_server(store, model, port)
        url = f"http://127.0.0.1:{port}"
        try:
            import httpx

            stats = httpx.get(f"{url}/stats", timeout=60).json()
            run_load(url, 2, 60, args.warmup, args.k, args.distinct, args.filtered)
            runs = []
            for clients in [int(c) for c in args.clients.split(",")]:
                log(f"{clients} client(s) for up to {args.seconds:g} s …")
                result = run_load(url, clients, args.seconds, args.max_requests, args.k,
                                  args.distinct, args.filtered)
                log(f"  {result['throughput_rps']} req/s, p50 {result['latency_ms']['p50']} ms, "
                    f"p95 {result['latency_ms']['p95']} ms, errors {result['errors'] or 0}")
                runs.append(result)
        finally:
            server.terminate()
            server.wait(timeout=30)
    at8 = next((r for r in runs if r["clients"] == 8), None)
    doc = {
        "benchmark": "serve", "store": {"count": stats["count"], "dim": stats["dim"],
                                        "index_type": stats["index_type"], "model": stats["model"]
                                        if args.store else "tiny test model (synthetic store)"},
        "k": args.k, "distinct_queries": args.distinct, "filtered": args.filtered,
        "cpu_count": os.cpu_count(), "runs": runs,
        "target": {"clients": 8, "no_errors": bool(at8 and not at8["errors"]),
                   "p95_le_2x_p50": bool(at8 and at8["p95_over_p50"] is not None
                                         and at8["p95_over_p50"] <= 2.0)} if at8 else None,
    }
    print(json.dumps(doc, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
