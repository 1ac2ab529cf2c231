"""Text-tower start-up: load time and first-query time of each way to get the text tower.

Each way runs in a fresh process (page cache warm: one untimed warm-up process reads the files
first), timing the imports, the tower's load and the first query (tokenise + forward), with
the process's peak resident memory:

- ``from_pretrained``: ``SiglipTextModel.from_pretrained`` on the whole checkpoint (the loader
  before the text-weights path), fp32;
- ``text_weights``: only the ``text_model.*`` tensors, memory-mapped into a meta-device tower
  (retrieval.model.texttower), fp32;
- ``int8_quantise``: the text-weights tower quantised to int8 now (no cache folder);
- ``int8_cached``: the int8 tower from its cache entry (retrieval.model.texttower);
- ``onnx_cached``: the ONNX int8 export from its cache (retrieval.model.onnx_text), when ONNX
  Runtime is installed.

Each way's vectors are compared with ``from_pretrained``'s (minimum cosine over the queries).

    python benchmarks/text_tower.py --json                 # the tiny test model
    python benchmarks/text_tower.py --full-size --json     # also the full-size random MedSigLIP-448
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402

WAYS = ("from_pretrained", "text_weights", "int8_quantise", "int8_cached", "onnx_cached")
QUERIES = ["left pneumothorax", "right pleural effusion", "cardiomegaly", "lung nodule",
           "a chest x-ray showing pneumonia"]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's peak
    across the fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(way: str, checkpoint_dir: Path, cache_dir: Path) -> dict:
    """One way, timed in this (fresh) process."""
    if way == "warm":
        return warm(checkpoint_dir, cache_dir)
    started = time.perf_counter()
    import numpy as np

    from retrieval.model import resolve_checkpoint

    if way == "onnx_cached":  # imports no torch: ONNX Runtime and the tokenizer load below
        from retrieval.model.onnx_text import OnnxTextEncoder
    else:
        import torch
        from transformers import AutoTokenizer, SiglipTextModel

        from retrieval.model import acceleration
        from retrieval.model.checkpoint import load_tower
        from retrieval.model.encoders import TextEncoder, _normalise
        from retrieval.model.texttower import load_text_tower
    checkpoint = resolve_checkpoint(str(checkpoint_dir))
    imported = time.perf_counter()
    if way == "onnx_cached":
        encoder = OnnxTextEncoder(checkpoint, cache_dir)
        embed = encoder.embed
    else:
        device = torch.device("cpu")
        acceleration.configure_cpu_threads()
        if way == "from_pretrained":
            model = acceleration.prepare_model(load_tower(SiglipTextModel, checkpoint), device,
                                               "fp32")
        else:
            precision = "fp32" if way == "text_weights" else "int8"
            model, how = load_text_tower(checkpoint, device, precision,
                                         cache_dir if way == "int8_cached" else None)
            assert way != "int8_cached" or how == "int8-cache", how
        tokenizer = TextEncoder.__new__(TextEncoder)  # its token_ids recipe, nothing loaded
        tokenizer.tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)

        def embed(texts: list[str]) -> np.ndarray:
            with torch.inference_mode():
                return _normalise(model(input_ids=tokenizer.token_ids(texts)).pooler_output)
    loaded = time.perf_counter()
    first = embed(QUERIES[:1])
    queried = time.perf_counter()
    vectors = embed(QUERIES)
    return {"way": way, "imports_s": imported - started, "load_s": loaded - imported,
            "first_query_s": queried - loaded, "total_s": queried - started,
            "peak_rss_mb": peak_rss_mb(),
            "vectors": vectors.tolist(), "first": first.tolist()}


def warm(checkpoint_dir: Path, cache_dir: Path) -> dict:
    """Write the int8 and ONNX cache entries (untimed)."""
    import torch

    from retrieval.model import resolve_checkpoint
    from retrieval.model.texttower import load_text_tower

    checkpoint = resolve_checkpoint(str(checkpoint_dir))
    _, how = load_text_tower(checkpoint, torch.device("cpu"), "int8", cache_dir)
    try:
        from retrieval.model.onnx_text import OnnxTextEncoder

        OnnxTextEncoder(checkpoint, cache_dir)
    except ImportError:
        pass
    return {"way": "warm", "int8": how}


def run_child(way: str, checkpoint_dir: Path, cache_dir: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", way, "--checkpoint",
                           str(checkpoint_dir), "--cache-dir", str(cache_dir)],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        return {"way": way, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(checkpoint_dir: Path, cache_dir: Path, runs: int,
            only: list[str] | None = None) -> dict:
    """Every way on one checkpoint: medians over ``runs`` processes, and cosines to the
    ``from_pretrained`` tower's vectors."""
    import numpy as np

    ways = [w for w in WAYS if not only or w in only or w == "from_pretrained"]
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        ways = [w for w in ways if w != "onnx_cached"]
    # warm-ups, in their own processes (this one stays small): the page cache, and the int8
    # and ONNX cache entries the cached ways load
    run_child("text_weights", checkpoint_dir, cache_dir)
    run_child("warm", checkpoint_dir, cache_dir)
    results, reference = {}, None
    for way in ways:
        samples = [run_child(way, checkpoint_dir, cache_dir) for _ in range(runs)]
        if "error" in samples[0]:
            results[way] = samples[0]
            continue
        vectors = np.array(samples[0]["vectors"], np.float32)
        reference = vectors if way == "from_pretrained" else reference
        doc = {key: round(statistics.median(s[key] for s in samples), 3)
               for key in ("imports_s", "load_s", "first_query_s", "total_s", "peak_rss_mb")}
        if reference is not None:
            doc["min_cosine_to_from_pretrained"] = round(float(
                (vectors * reference).sum(1).min()), 6)
        results[way] = doc
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per way (median)")
    parser.add_argument("--full-size", action="store_true",
                        help="also the full-size random MedSigLIP-448 (~3.5 GB, written once)")
    parser.add_argument("--ways", nargs="+", choices=WAYS,
                        help="only these ways (from_pretrained, the reference, always runs)")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=(*WAYS, "warm"), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "MEDSEARCH_BENCH_CACHE", Path.home() / ".cache" / "medsearch-bench")))
    args = parser.parse_args(argv)
    if args.child:
        doc = child(args.child, args.checkpoint, args.cache_dir)
        print(json.dumps(doc))
        return doc
    from retrieval.model.testmodel import make_test_model

    doc: dict = {"machine": cpu(), "runs": args.runs, "queries": len(QUERIES)}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_tiny:
            tiny = make_test_model(Path(tmp) / "tiny")
            doc["tiny"] = measure(tiny, Path(tmp) / "cache", args.runs, args.ways)
    if args.full_size:
        from benchmarks.embed import full_size_checkpoint

        full = full_size_checkpoint(args.cache_dir)
        doc["full_size"] = measure(full, args.cache_dir / "text-tower-cache", args.runs,
                                   args.ways)
    print(json.dumps(doc, indent=None if args.json else 1))
    return doc


if __name__ == "__main__":
    main()
