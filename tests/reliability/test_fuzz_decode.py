"""Fuzzing the shared decode entry: atheris (libFuzzer) over DICOM, PNG, JPEG and TIFF seeds.

The property: ``decode_source`` never raises, never hangs past the per-input limit, never
exceeds the memory limit and never takes its process down. CI runs one short libFuzzer run
over every format's seeds at once; ``benchmarks/fuzz.py --seconds N`` runs each format longer.
Inputs that once crashed a decoder are kept in tests/data/fuzz/ and replayed here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from indexer.decode import DecodeOptions, decode_source
from indexer.sources import SourceFile

ROOT = Path(__file__).resolve().parents[2]
#: Peak RSS growth allowed while decoding one kept input.
MEMORY_BOUND_MB = 300
REGRESSIONS = sorted((ROOT / "tests" / "data" / "fuzz").glob("*"))


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_bench", ROOT / "benchmarks" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regression_inputs_fail_cleanly_in_a_child_process():
    """Each kept input once took a decoder down: GDCM segfaulted on two and allocated 4 GB on
    two, pylibjpeg-rle panicked (a BaseException) on one. Three (``gdcm_*_abort``) make GDCM
    throw a C++ exception it does not catch: its limited child must abort, not be caught by
    a frame of the caller's (the fuzzer's), which once counted them as crashes of the parent.
    Each must now come back as an error in bounded memory; replayed in a child process so a
    regression shows as a dead child rather than a dead test run."""
    assert REGRESSIONS
    script = """
import os, sys
from indexer.decode import DecodeOptions, decode_source
from indexer.sources import SourceFile
import resource
for p in sys.argv[1:]:
    kind = "dicom" if p.endswith(".dcm") else "image"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    d = decode_source(SourceFile(p, os.path.getsize(p), 0, kind), DecodeOptions(image_size=32))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    print(os.path.basename(p), "|", grown, "|", d.error, flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script, *map(str, REGRESSIONS)],
                          capture_output=True, text=True, cwd=ROOT, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-1500:])
    lines = {name: (int(grown), reason) for name, grown, reason in
             (line.split(" | ", 2) for line in done.stdout.strip().splitlines())}
    assert set(lines) == {p.name for p in REGRESSIONS}
    assert all(reason not in ("", "None") for _, reason in lines.values()), lines
    assert all(grown < MEMORY_BOUND_MB for grown, _ in lines.values()), lines


def test_seeds_decode_and_a_short_libfuzzer_run_finds_nothing(tmp_path):
    fuzz = _fuzz_module()
    for fmt in fuzz.FORMATS:  # the seeds themselves are valid files of their format
        folder = tmp_path / f"seeds-{fmt}"
        fuzz.write_seeds(fmt, folder)
        for seed in sorted(folder.iterdir()):
            if seed.name in {p.name for p in REGRESSIONS}:
                continue
            kind = "dicom" if fmt == "dicom" else "image"
            decoded = decode_source(SourceFile(str(seed), seed.stat().st_size, 0, kind),
                                    DecodeOptions(image_size=32))
            assert decoded.error is None and decoded.frames, (seed.name, decoded.error)
    report = fuzz.fuzz(8, ["mixed"], tmp_path / "artifacts")
    run = report["formats"]["mixed"]
    assert run["inputs"] > 50, run
    assert (run["crashes"], run["timeouts"], run["ooms"], run["exit_code"]) == (0, 0, 0, 0), run
