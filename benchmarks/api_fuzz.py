"""Schemathesis against the live `medsearch serve`: generated requests from its own OpenAPI schema.

Builds a small store (tiny test model, a few PNG/JPEG images and pydicom's CT_small.dcm),
starts the real CLI server on 127.0.0.1 twice (without a token, and with one) and runs
`schemathesis run` on each one's /openapi.json: every phase (examples, coverage, fuzzing,
stateful), every check (no 5xx, documented status codes, content types and response schemas,
schema-invalid requests refused, auth not ignored), with `accepted_when_valid` and
`refused_when_invalid` (benchmarks/api_fuzz_checks.py) in place of the built-in positive- and
negative-data checks. Prints one JSON
document: cases tried and failures by kind, per run.

    python benchmarks/api_fuzz.py --seconds 120           # two runs of 120 s each
    python benchmarks/api_fuzz.py --seconds 20 --seed 7   # what CI runs (tests/reliability)

Exit status 1 when any run found a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402
from benchmarks.serve import free_port  # noqa: E402

TOKEN = "fuzz-token-0123456789abcdefghij"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _env() -> dict:
    """The environment of the subprocesses: this checkout first on the path, nothing online."""
    env = {k: v for k, v in os.environ.items() if k != "MEDSEARCH_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _medsearch() -> list[str]:
    return [sys.executable, "-c", "from medsearch.cli import main; main()"]


def build_store(folder: Path, model: Path | None = None) -> Path:
    """A small real store: tiny model, 6 images of three kinds and one CT DICOM."""
    sys.path.insert(0, str(ROOT))
    import pydicom

    from retrieval.model.testmodel import make_test_model
    from tests.conftest import write_images

    model = model or make_test_model(folder / "model" / "tiny-siglip")
    images = folder / "images"
    write_images(images, 6, seed=3)
    shutil.copy(Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm", images)
    subprocess.run([*_medsearch(), "index", str(images), "--store", str(folder / "store"),
                    "--model", str(model), "--workers", "0", "--no-progress"],
                   check=True, env=_env(), capture_output=True, timeout=600)
    return folder / "store"


@contextmanager
def serving(store: Path, *tokens: str | None) -> Iterator[list[str]]:
    """`medsearch serve` on ``store`` once per token (None: without one), each in a subprocess
    on a free loopback port, all starting at once; yields their base URLs in that order."""
    import httpx

    started = []
    try:
        for token in tokens or (None,):
            port, env = free_port(), _env()
            if token:
                env["MEDSEARCH_TOKEN"] = token
            logfile = tempfile.TemporaryFile()
            process = subprocess.Popen([*_medsearch(), "serve", "--store", str(store), "--port",
                                        str(port), "--log-level", "warning"], env=env,
                                       stdout=logfile, stderr=subprocess.STDOUT)
            started.append((process, f"http://127.0.0.1:{port}", logfile))
        deadline = time.monotonic() + 180
        for process, url, logfile in started:
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    logfile.seek(0)
                    raise RuntimeError("medsearch serve did not start:\n" +
                                       logfile.read().decode(errors="replace")[-3000:])
                time.sleep(0.3)
        yield [url for _, url, _ in started]
    finally:
        for process, _, logfile in started:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            logfile.close()


def fuzz(url: str, token: str | None, seconds: float, seed: int,
         max_examples: int = 50) -> dict:
    """One `schemathesis run` against ``url``: cases tried, failures by kind, output tail."""
    with tempfile.TemporaryDirectory(prefix="medsearch-fuzz-") as folder:
        report = Path(folder) / "report.json"
        command = [
            sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance,negative_data_rejection",
            "--max-time", str(max(1, int(seconds))), "-n", str(max_examples), "--seed", str(seed),
            "--workers", "1", "--generation-database", "none", "--no-color",
            "--request-timeout", "60", "--report", "json", "--report-json-path", str(report),
        ]
        if token:
            command += ["--header", f"Authorization: Bearer {token}"]
        env = {**_env(), "SCHEMATHESIS_HOOKS": "benchmarks.api_fuzz_checks"}
        started = time.monotonic()
        done = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True,
                              timeout=seconds * 3 + 300)
        output = done.stdout + done.stderr
        if not report.exists():
            raise RuntimeError(f"schemathesis wrote no report (exit {done.returncode}):\n"
                               + output[-4000:])
        doc = json.loads(report.read_text())
    failures = {f"{f['code']} {f['title']}": {"count": f["count"], "operations": f["operations"]}
                for f in doc.get("failures", [])}
    return {
        "token": bool(token), "seed": seed, "seconds": round(time.monotonic() - started, 1),
        "cases": doc["test_cases"]["generated"],
        "unique_failures": doc["test_cases"]["unique_failures"],
        "errored": doc["test_cases"]["errored"] + len(doc.get("errors", [])),
        "failures": failures, "operations_tested": doc["operations"]["tested"],
        "exit_code": done.returncode, "output_tail": "" if done.returncode == 0 else output[-6000:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120, help="per run (two runs)")
    parser.add_argument("--max-examples", type=int, default=100, help="per operation and phase")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--store", type=Path, help="a store to serve instead of a built one")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory(prefix="medsearch-fuzz-") as folder:
        store = args.store or build_store(Path(folder))
        runs = []
        for token in (None, TOKEN):
            with serving(store, token) as (url,):
                log(f"fuzzing {url} ({'with' if token else 'without'} a token) "
                    f"for {args.seconds:g} s, seed {seed}")
                runs.append(fuzz(url, token, args.seconds, seed, args.max_examples))
    doc = {"runs": runs, "cases": sum(r["cases"] for r in runs),
           "failures": sum(r["unique_failures"] + r["errored"] for r in runs), "cpu": cpu()}
    print(json.dumps(doc, indent=1))
    sys.exit(1 if doc["failures"] else 0)


if __name__ == "__main__":
    main()
