"""Fuzz the shared decode entry (indexer.decode.decode_source) with atheris (libFuzzer).

For each format (DICOM, PNG, JPEG, TIFF) a child process runs libFuzzer, seeded with a few small
valid files, under -max_total_time, -rss_limit_mb and a per-input -timeout. The property:
decode_source never raises (a bad input becomes ``error`` or ``skipped``), never hangs past the
per-input limit, never exceeds the memory limit, never takes the process down. Prints JSON:
inputs tried per format, crashes, timeouts, peak RSS, the CPU model. Crash inputs are kept under
--artifacts; a small one belongs in tests/data/fuzz/ as a regression seed once fixed.

    python benchmarks/fuzz.py --seconds 240            # the long run (split over the formats)
    python benchmarks/fuzz.py --seconds 20 --formats png,dicom
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu  # noqa: E402

FORMATS = ("dicom", "png", "jpeg", "tiff")
SUFFIX = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg", "tiff": ".tif", "mixed": ".bin"}
#: ``mixed``: every format's seeds in one run (one start-up: the CI test), kind by magic bytes.
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"II*\x00", b"MM\x00*")
DICOM_SEEDS = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEG-lossy.dcm",
               "SC_rgb_small_odd.dcm")
#: Per input: seconds before libFuzzer calls it a hang, and the memory ceiling.
INPUT_TIMEOUT_S = 20
RSS_LIMIT_MB = 3072


def write_seeds(fmt: str, folder: Path) -> int:
    """A few small valid files of one format (and any regression seeds kept in tests/data/fuzz)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "mixed":
        for each in FORMATS:
            write_seeds(each, folder)
        return len(list(folder.iterdir()))
    if fmt == "dicom":
        from pydicom.data import get_testdata_file

        for name in DICOM_SEEDS:
            path = get_testdata_file(name)
            if path:
                shutil.copy(path, folder / name)
    else:
        rng = np.random.default_rng(7)
        images = [Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)),
                  Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
                  Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 200))]
        for i, img in enumerate(images):
            if fmt == "jpeg" and img.mode not in ("L", "RGB"):
                continue
            buffer = io.BytesIO()
            options = {"tiff": {"compression": "tiff_adobe_deflate"}}.get(fmt, {})
            img.save(buffer, format=fmt.upper(), **options)
            (folder / f"seed{i}{SUFFIX[fmt]}").write_bytes(buffer.getvalue())
        if fmt in ("tiff", "png"):  # a multi-frame one: pages / APNG frames
            frames = [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(4)]
            frames[0].save(folder / f"multi{SUFFIX[fmt]}", save_all=True, append_images=frames[1:])
    regressions = ROOT / "tests" / "data" / "fuzz"
    for path in sorted(regressions.glob(f"*{SUFFIX[fmt]}")) if regressions.is_dir() else []:
        shutil.copy(path, folder / path.name)
    return len(list(folder.iterdir()))


def run_target(fmt: str, seconds: float, corpus: Path, artifacts: Path) -> dict:
    """One libFuzzer run in a child process; its final stats parsed."""
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(Path(__file__).resolve()), "--target", fmt, str(corpus),
            f"-max_total_time={max(int(seconds), 1)}", f"-timeout={INPUT_TIMEOUT_S}",
            f"-rss_limit_mb={RSS_LIMIT_MB}", "-print_final_stats=1", "-close_fd_mask=3",
            f"-artifact_prefix={artifacts}/{fmt}-", "-max_len=65536"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=seconds + 120 + 2 * INPUT_TIMEOUT_S)
    log = done.stdout + done.stderr
    stat = {k: int(v) for k, v in re.findall(r"stat::(\w+):\s*(\d+)", log)}
    crashes = sorted(p.name for p in artifacts.glob(f"{fmt}-crash-*"))
    timeouts = sorted(p.name for p in artifacts.glob(f"{fmt}-timeout-*"))
    ooms = sorted(p.name for p in artifacts.glob(f"{fmt}-oom-*"))
    return {"inputs": stat.get("number_of_executed_units", 0), "crashes": len(crashes),
            "timeouts": len(timeouts), "ooms": len(ooms),
            "peak_rss_mb": stat.get("peak_rss_mb"), "seconds": round(time.monotonic() - started, 1),
            "exit_code": done.returncode, "artifacts": crashes + timeouts + ooms,
            "log_tail": "" if done.returncode == 0 else log[-1500:]}


def fuzz(seconds: float, formats: list[str], artifacts: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="medsearch-fuzz-") as scratch:
        artifacts = artifacts or Path(tempfile.mkdtemp(prefix="medsearch-fuzz-artifacts-"))
        report = {"cpu": cpu(), "seconds_per_format":
                  round(seconds / len(formats), 1), "input_timeout_s": INPUT_TIMEOUT_S,
                  "rss_limit_mb": RSS_LIMIT_MB, "formats": {}}
        for fmt in formats:
            corpus = Path(scratch) / f"corpus-{fmt}"
            seeds = write_seeds(fmt, corpus)
            report["formats"][fmt] = {"seeds": seeds, **run_target(
                fmt, seconds / len(formats), corpus, artifacts)}
        runs = report["formats"].values()
        report["inputs"] = sum(r["inputs"] for r in runs)
        report["crashes"] = sum(r["crashes"] for r in runs)
        report["timeouts"] = sum(r["timeouts"] for r in runs)
        report["ooms"] = sum(r["ooms"] for r in runs)
        report["max_rss_mb"] = max((r["peak_rss_mb"] or 0) for r in runs)
        report["artifacts_dir"] = str(artifacts) if report["crashes"] + report["timeouts"] + \
            report["ooms"] else None
        return report


# -- the libFuzzer target (runs in the child) ----------------------------------------------------
def target_main(fmt: str, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["indexer"]):
        from indexer.decode import Decoded, DecodeOptions, decode_source
        from indexer.sources import SourceFile

    folder = Path(tempfile.mkdtemp(prefix="medsearch-fuzz-input-"))
    path = folder / f"input{SUFFIX[fmt]}"
    kind = "dicom" if fmt == "dicom" else "image"
    options = DecodeOptions(image_size=32, frames="2")

    def one_input(data: bytes) -> None:
        what = kind
        if fmt == "mixed":
            what = "image" if data.startswith(IMAGE_MAGIC) else "dicom"
        path.write_bytes(data)
        result = decode_source(SourceFile(str(path), len(data), 0, what), options)
        if not isinstance(result, Decoded):
            raise AssertionError("decode_source returned something else")
        if result.error is None and result.skipped is None and not result.frames:
            raise AssertionError("no error, no skip and no frames")

    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--target":
        target_main(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240.0, help="total, split over formats")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="keep crash/timeout inputs here (default: a temp folder)")
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = set(formats) - set(FORMATS) - {"mixed"}
    if unknown:
        parser.error(f"unknown format(s): {', '.join(sorted(unknown))}")
    report = fuzz(args.seconds, formats, args.artifacts)
    for run in report["formats"].values():
        if not run["log_tail"]:
            run.pop("log_tail")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
