#!/usr/bin/env python3
"""DICOM conformance: decode and convert every file shipped in pydicom's test set.

Runs the indexer's own decode step (`indexer.decode.decode_source`: read, decode, display
steps, model input) on each file in a worker process with a time limit, and writes the outcome
table by transfer syntax and photometric interpretation to docs/dicom-conformance.md.
With DCMTK installed, each rendered first frame is also compared with `dcmj2pnm` (an
independent renderer): the Pearson correlation of the two grey images is reported.

    python scripts/dicom_conformance.py [--out docs/dicom-conformance.md] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: A decode slower than this per file counts as a hang (the largest bundled file takes < 1 s).
TIMEOUT_S = 60.0


@dataclass
class Outcome:
    file: str
    transfer_syntax: str
    photometric: str
    status: str          # indexed | skipped | failed | not-dicom | timeout
    frames: int
    reason: str
    seconds: float
    dcmtk_r: float | None = None


def test_files_folder() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


def describe(path: Path) -> tuple[str, str]:
    """Transfer syntax and photometric interpretation as the reader sees them."""
    from indexer.dicom import read_dataset, transfer_syntax

    try:
        ds = read_dataset(path)
    except Exception:
        return "unreadable", "-"
    return transfer_syntax(ds), str(ds.get("PhotometricInterpretation", "-") or "-")


def decode_one(path: str, size: int = 64) -> dict:
    """Worker: decode one file as the indexer does; the first frame's display image too."""
    from indexer.decode import DecodeOptions, decode_source
    from indexer.sources import classify, SourceFile

    p = Path(path)
    kind = classify(p)
    started = time.perf_counter()
    if kind is None:
        return {"status": "not-dicom", "frames": 0, "seconds": 0.0,
                "reason": "not an image or DICOM file (by name and content): not considered"}
    st = p.stat()
    result = decode_source(SourceFile(str(p), st.st_size, st.st_mtime_ns, kind),
                           DecodeOptions(image_size=size, frames="middle", phi_policy="drop"))
    seconds = time.perf_counter() - started
    if result.error:
        return {"status": "failed", "frames": 0, "reason": result.error, "seconds": seconds}
    if result.skipped:
        return {"status": "skipped", "frames": 0, "reason": result.skipped, "seconds": seconds}
    return {"status": "indexed", "frames": len(result.frames), "reason": "", "seconds": seconds}


def rendered_first_frame(path: str):
    """Our display image of frame 0, float in [0, 1] (grey H×W or colour H×W×3)."""
    from indexer.dicom import read_dataset
    from indexer.dicom_frames import dicom_frames

    _, unit = next(dicom_frames(read_dataset(path), path, [0]))
    return unit


def _luminance(image):
    return image @ [0.299, 0.587, 0.114] if image.ndim == 3 else image


def dcmtk_agreement(path: str) -> float | None:
    """Pearson r between our frame 0 and dcmj2pnm's (first VOI window, else min-max)."""
    import numpy as np
    from PIL import Image

    exe = shutil.which("dcmj2pnm")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ref.png"
        for window in (["+Wi", "1"], ["+Wm"], []):
            done = subprocess.run([exe, "+on", *window, "+F", "1", path, str(out)],
                                  capture_output=True, timeout=60)
            if done.returncode == 0 and out.is_file():
                break
        else:
            return None
        ref = np.asarray(Image.open(out), dtype=np.float64)
    try:
        ours = rendered_first_frame(path).astype(np.float64)
    except Exception:
        return None
    if ours.ndim != ref.ndim:
        ours, ref = _luminance(ours), _luminance(ref)
    if ours.shape != ref.shape or ours.std() == 0 or ref.std() == 0:
        return None
    return float(np.corrcoef(ours.ravel(), ref.ravel())[0, 1])


def decode_entry(path: str) -> tuple[str, dict]:
    return path, decode_one(path)


def decode_lost(path: str, reason: str) -> tuple[str, dict]:
    status = "timeout" if "longer than" in reason else "failed"
    return path, {"status": status, "frames": 0, "seconds": 0.0, "reason": reason}


def run(folder: Path, timeout: float = TIMEOUT_S, workers: int = 2, dcmtk: bool = True) -> list[Outcome]:
    """Each file in the indexer's supervised pool: a crash or hang costs that file alone."""
    from indexer.workers import SupervisedPool

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with SupervisedPool(decode_lost, workers=workers, window=workers * 2, timeout_s=timeout) as pool:
        results = dict(pool.map(decode_entry, [str(p) for p in files]))
    outcomes = []
    for p in files:
        res = results[str(p)]
        ts, photometric = ("-", "-") if res["status"] == "not-dicom" else describe(p)
        outcome = Outcome(str(p.relative_to(folder)), ts, photometric, res["status"],
                          res["frames"], res["reason"], round(res["seconds"], 3))
        if dcmtk and outcome.status == "indexed":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = dcmtk_agreement(str(p))
            outcome.dcmtk_r = None if r is None else round(r, 4)
        outcomes.append(outcome)
    return outcomes


def markdown(outcomes: list[Outcome]) -> str:
    import pydicom

    counts = Counter(o.status for o in outcomes)
    lines = [
        "# DICOM conformance",
        "",
        "Generated by `python scripts/dicom_conformance.py` (do not edit by hand): every file in",
        f"pydicom {pydicom.__version__}'s bundled test set (`pydicom/data/test_files`, "
        f"{len(outcomes)} files) through the indexer's decode step",
        "(`indexer.decode.decode_source`: read, decode, modality LUT → VOI → MONOCHROME1,",
        "model input). `indexed`: yields vectors; `skipped`: valid object without an image;",
        "`failed`: broken, with the reason; `not-dicom`: not considered by the folder walk.",
        "`dcmtk r`: Pearson correlation of our frame 0 with DCMTK `dcmj2pnm` (first window),",
        "where DCMTK could render it (it has no JPEG 2000 / JPEG-LS decoder).",
        "",
        "Summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
        "## By transfer syntax and photometric interpretation",
        "",
        "| transfer syntax | photometric | indexed | skipped | failed | not-dicom | timeout |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for o in outcomes:
        groups[(o.transfer_syntax, o.photometric)][o.status] += 1
    for (ts, ph), c in sorted(groups.items()):
        lines.append(f"| {ts} | {ph} | {c['indexed']} | {c['skipped']} | {c['failed']} | "
                     f"{c['not-dicom']} | {c['timeout']} |")
    rs = [o.dcmtk_r for o in outcomes if o.dcmtk_r is not None]
    if rs:
        lines += ["", f"DCMTK agreement: {len(rs)} files compared, "
                  f"{sum(r >= 0.9 for r in rs)} with r ≥ 0.9, median r {sorted(rs)[len(rs) // 2]:.3f}."]
    lines += ["", "## Every file", "",
              "| file | transfer syntax | photometric | status | frames | s | dcmtk r | reason |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for o in outcomes:
        r = "" if o.dcmtk_r is None else f"{o.dcmtk_r:.3f}"
        reason = o.reason.replace("|", "\\|")
        lines.append(f"| {o.file} | {o.transfer_syntax} | {o.photometric} | {o.status} | "
                     f"{o.frames} | {o.seconds:.2f} | {r} | {reason} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dicom-conformance.md")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-dcmtk", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the outcomes as JSON")
    args = parser.parse_args()
    outcomes = run(args.folder or test_files_folder(), workers=args.workers,
                   dcmtk=not args.no_dcmtk)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(outcomes))
    summary = dict(Counter(o.status for o in outcomes))
    if args.json:
        print(json.dumps({"summary": summary, "files": [asdict(o) for o in outcomes]}))
    else:
        print(json.dumps(summary), file=sys.stderr)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
