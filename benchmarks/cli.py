"""Command-line latency: cold wall time and peak memory of one `medsearch` process per call.

Each figure is the median of ``--runs`` fresh processes (`python -m medsearch …` from this
checkout), with the peak resident memory of each (``os.wait4``'s ru_maxrss): `info`,
`similar --id`, `export --id`, a text `search` (a new query each run), a repeated text search
(the same query every run, after one warm-up: the persistent text cache answers), the two
searches again with the text tower exported to ONNX int8 (``text_runtime = "onnx"``), each
command again with `medsearch serve` running for the store (the command line then asks it),
and the import-time breakdown of the CLI
(`python -X importtime`). The store holds ``--n`` random unit vectors written through the
store's writer (no images are embedded), made with the tiny test model; ``--full-size`` adds a
store made with a full-size random MedSigLIP-448 checkpoint (~3.5 GB written once into
``--cache-dir``, ~3 GB resident per search).

    python benchmarks/cli.py --json                       # 100,000 vectors, 5 runs
    python benchmarks/cli.py --n 2000 --runs 1 --json     # a smoke run
    python benchmarks/cli.py --full-size --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402

QUERIES = ["pleural effusion", "left pneumothorax", "cardiomegaly", "rib fracture",
           "consolidation in the right lower lobe", "normal chest radiograph", "nodule",
           "pulmonary oedema", "atelectasis", "hiatus hernia", "a chest tube", "emphysema"]
HEAVY = ("torch", "transformers", "faiss")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def environment(runtime: Path) -> dict:
    """This checkout's code, offline, with the runtime folder the server publishes into."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "XDG_RUNTIME_DIR": str(runtime), "TOKENIZERS_PARALLELISM": "false"}


def compile_bytecode() -> None:
    """Byte-compile this checkout, as installing a wheel does: an editable install writes its
    bytecode on first use, unless PYTHONDONTWRITEBYTECODE is set (as on some CI machines), in
    which case every process would compile the project's ~60 modules again (~0.15 s)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "indexer", "retrieval",
                    "medsearch"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def with_cache(env: dict, cache_dir: Path) -> dict:
    """The medsearch cache folder (CPU precision probe, text cache, exported text towers)
    kept across benchmark runs, beside the full-size checkpoint: caches warm, as in use."""
    return {**env, "MEDSEARCH_CACHE_DIR": str(cache_dir / "medsearch-cache")}


def timed(args: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one fresh `medsearch` process."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "medsearch", *args], stdout=out,
                                stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"medsearch {' '.join(args)} exited {proc.returncode}: {text[-500:]}")
    return wall, usage.ru_maxrss / 1024, text


def python_loop_s() -> float:
    """Seconds of a fixed pure-Python loop (best of 3): how fast this shared machine runs
    Python right now. It moved by 1.6× within a minute on the development VM, so each
    section records it beside its figures."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        total = 0
        for i in range(2_000_000):
            total += i
        best = min(best, time.perf_counter() - start)
    return round(best, 4)


def measure(name: str, make_args, runs: int, env: dict, warm: bool = False) -> dict:
    """Median wall time and peak RSS of ``runs`` processes; ``make_args(i)`` gives run i's."""
    if warm:
        timed(make_args(0), env)
    walls, peaks = [], []
    for i in range(runs):
        wall, peak, _ = timed(make_args(i), env)
        walls.append(wall)
        peaks.append(peak)
    row = {"median_s": round(statistics.median(walls), 3), "runs_s": [round(w, 3) for w in walls],
           "peak_rss_mib": round(max(peaks), 1)}
    log(f"  {name}: {row['median_s']} s median, {row['peak_rss_mib']} MiB peak")
    return row


def commands(store: Path, out_dir: Path, with_text: bool, only_text: bool = False) -> dict:
    """name → (args for run i, warm-up first). A first search's query was never asked (a
    nonce per benchmark run: the persistent text cache cannot answer it); a repeated one was
    asked in the warm-up."""
    s = ["--store", str(store), "--json"]
    nonce = os.urandom(4).hex()
    found = {"info": (lambda i: ["info", *s], False),
             "similar_id": (lambda i: ["similar", "--id", str(5 + i), *s], False),
             "export_id": (lambda i: ["export", "--id", str(5 + i), "--out",
                                      str(out_dir / f"cohort-{i}.csv"), *s], False)}
    image = _query_image(out_dir)
    model = json.loads((store / "manifest.json").read_text())["model"]
    found["classify"] = (lambda i: ["classify", str(image), "--labels",
                                    "pleural effusion,pneumothorax,normal", "--model", model,
                                    *s], False)
    if only_text:
        found = {}
    if with_text:
        found["search_text"] = (lambda i: ["search", f"{QUERIES[i % len(QUERIES)]} {nonce}{i}",
                                           *s], False)
        found["search_repeated"] = (lambda i: ["search", f"{QUERIES[0]} {nonce}", *s], True)
    return found


def _query_image(out_dir: Path) -> Path:
    """A 256×256 PNG for `classify`: the image is embedded on every run (a server keeps the
    label vectors of its first run, as it does for a script that classifies many images)."""
    from PIL import Image

    path = out_dir / "classify-query.png"
    if not path.exists():
        ramp = np.add.outer(np.arange(256), np.arange(256)) % 256
        Image.fromarray(ramp.astype(np.uint8)).save(path)
    return path


def build_store(folder: Path, checkpoint: Path, n: int, seed: int = 0) -> Path:
    """``n`` random unit vectors through the store's writer, manifest of ``checkpoint``."""
    from retrieval.model import resolve_checkpoint
    from retrieval.model.names import PREPROCESSING_VERSION
    from retrieval.store import Manifest, NewFile, NewImage, Store

    ckpt = resolve_checkpoint(str(checkpoint))
    config = ckpt.config
    dim = int(config.get("vision_config", config).get("projection_size")
              or config.get("vision_config", config)["hidden_size"])
    manifest = Manifest(model=str(ckpt.path), model_revision=ckpt.revision,
                        model_fingerprint=ckpt.fingerprint, dim=dim,
                        preprocessing_version=PREPROCESSING_VERSION, index_type="auto")
    rng = np.random.default_rng(seed)
    store = Store.create(folder, manifest)
    for start in range(0, n, 5000):
        block = rng.normal(size=(min(5000, n - start), dim)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        with store.writer() as writer:
            writer.add_files([NewFile(f"/synthetic/{start + j:07d}.png", 1, 0,
                                      f"{start + j:040x}", "image",
                                      [NewImage(0, 448, 448, block[j], {"modality": "CR"})])
                              for j in range(len(block))])
    store.maintain_index()
    store.save()
    store.close()
    return folder


def prepare(label: str, store: Path, n: int, cache_dir: Path) -> None:
    """The checkpoint (the tiny test model beside the store, or the full-size random one in
    ``cache_dir``) and a store of ``n`` random vectors made with it."""
    if label == "tiny":
        from retrieval.model.testmodel import make_test_model

        checkpoint = make_test_model(store.with_name(store.name + "-model"))
    else:
        from benchmarks.embed import full_size_checkpoint

        checkpoint = full_size_checkpoint(cache_dir)
    build_store(store, checkpoint, n)


def serve(store: Path, env: dict) -> subprocess.Popen:
    """`medsearch serve` for ``store``, once it has published where it listens and answers."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "medsearch", "serve", "--store", str(store),
                               "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("medsearch serve exited")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.25)
    server.kill()
    raise SystemExit("medsearch serve did not start")


def import_times(env: dict, top: int = 15) -> dict:
    """`python -X importtime -c 'import medsearch.cli.main'`: the slowest modules (cumulative)
    and the totals of torch, transformers and faiss (0: not imported)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import medsearch.cli.main"],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    rows = []
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            rows.append({"module": match[4], "self_s": int(match[1]) / 1e6,
                         "cumulative_s": int(match[2]) / 1e6, "depth": len(match[3]) // 2})
    by_name = {r["module"]: r for r in rows}
    total = sum(r["cumulative_s"] for r in rows if r["depth"] == 0)
    return {"total_s": round(total, 3),
            "top": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                    for r in sorted(rows, key=lambda r: -r["cumulative_s"])[:top]],
            **{f"{name}_s": round(by_name[name]["cumulative_s"], 3) if name in by_name else 0.0
               for name in HEAVY}}


def bench_store(label: str, store: Path, runs: int, env: dict, out_dir: Path) -> dict:
    """Every command without and with a server for the store; text searches also with the
    text tower exported to ONNX int8 (text_runtime = onnx; the export is made by a warm-up
    search first, once per checkpoint)."""
    section = {}
    for where in ("local", "local_onnx", "server"):
        server = serve(store, env) if where == "server" else None
        run_env = {**env, "MEDSEARCH_TEXT_RUNTIME": "onnx"} if where == "local_onnx" else env
        try:
            probe = python_loop_s()
            log(f"{label}, {where}: (load average {os.getloadavg()[0]:.2f}, loop {probe} s)")
            section[f"{where}_python_loop_s"] = probe
            if where == "local_onnx":
                timed(["search", "warm-up export", "--store", str(store), "--json"], run_env)
            section[f"{where}_load_average"] = round(os.getloadavg()[0], 2)
            section[where] = {name: measure(name, make, runs, run_env, warm)
                              for name, (make, warm) in commands(
                                  store, out_dir, True, only_text=where == "local_onnx").items()}
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=60)
    return section


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors in each store")
    parser.add_argument("--runs", type=int, default=5, help="processes per figure (median)")
    parser.add_argument("--full-size", action="store_true",
                        help="also a full-size random MedSigLIP-448 store (~3 GB per search)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "medsearch-bench",
                        help="where the full-size random checkpoint is written once")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--prepare", choices=("tiny", "full_size"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare:  # internal: build one store (see main below) into --out
        prepare(args.prepare, args.out, args.n, args.cache_dir)
        return {}
    machine = cpu()
    log(f"CPU: {machine['model']} ({machine['cores']} cores; {' '.join(machine['flags'])})")
    compile_bytecode()
    with tempfile.TemporaryDirectory(prefix="medsearch-cli-bench-") as tmp:
        tmp_path = Path(tmp)
        runtime = tmp_path / "runtime"
        env = with_cache(environment(runtime), args.cache_dir)
        doc = {"machine": machine, "n": args.n, "runs": args.runs, "bytecode": "compiled",
               "import_time": import_times(env), "stores": {}}
        for label in ("tiny", "full_size") if args.full_size else ("tiny",):
            log(f"building the {label} store of {args.n} vectors …")
            started = time.perf_counter()
            store = tmp_path / f"store-{label}"
            # in a process of its own: this one stays small, so the peak memory that each
            # measured child inherits at fork (ru_maxrss survives exec) is not torch's
            subprocess.run([sys.executable, __file__, "--prepare", label, "--n", str(args.n),
                            "--cache-dir", str(args.cache_dir), "--out", str(store)],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            manifest = json.loads((store / "manifest.json").read_text())
            doc["stores"][label] = {
                "machine": machine, "dim": manifest["dim"], "index_type": manifest["index_type"],
                "build_s": round(time.perf_counter() - started, 1),
                **bench_store(label, store, args.runs, env, tmp_path)}
    text = json.dumps(doc, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    return doc


if __name__ == "__main__":
    main()
