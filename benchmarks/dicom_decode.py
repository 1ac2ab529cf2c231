#!/usr/bin/env python3
"""DICOM decode + conversion throughput of one worker, over pydicom's bundled test files.

Measures, in this one process (= one decode worker of the indexer), for every file that yields
an image: read + decode + display steps (frames/s), and the same plus the MedSigLIP input
recipe at --size (what a worker hands the encoder). Multiply by the worker count for the rate
a GPU can be fed. Prints one JSON document.

    python benchmarks/dicom_decode.py [--size 448] [--repeat 3] [--frames all]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--frames", default="all", help="frame policy: all|first|middle|N")
    args = parser.parse_args()

    import pydicom
    import torch

    from indexer.decode import select_frames
    from indexer.dicom import frame_count, read_dataset, transfer_syntax
    from indexer.dicom_frames import dicom_frames
    from retrieval.model.preprocess import model_input

    torch.set_num_threads(1)  # as in the indexer's workers
    warnings.simplefilter("ignore")
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = read_dataset(path)
            wanted = select_frames(frame_count(ds), args.frames)
            list(dicom_frames(ds, path, wanted[:1]))
        except Exception:
            continue  # no image or broken: the conformance script reports those
        files.append((path, transfer_syntax(ds), wanted))

    def timed(with_model_input: bool) -> tuple[float, int, dict]:
        per_ts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        total_s, total_frames = 0.0, 0
        for path, ts, wanted in files:
            best = float("inf")
            for _ in range(args.repeat):
                started = time.perf_counter()
                ds = read_dataset(path)
                for _, unit in dicom_frames(ds, path, wanted):
                    if with_model_input:
                        model_input(unit, args.size)
                best = min(best, time.perf_counter() - started)
            total_s += best
            total_frames += len(wanted)
            per_ts[ts][0] += best
            per_ts[ts][1] += len(wanted)
        return total_s, total_frames, per_ts

    decode_s, frames, per_ts = timed(False)
    full_s, _, per_ts_full = timed(True)
    doc = {
        "benchmark": "dicom_decode",
        "files": len(files),
        "frames": frames,
        "frame_policy": args.frames,
        "size": args.size,
        "decode_frames_per_s_per_worker": round(frames / decode_s, 1),
        "decode_and_model_input_frames_per_s_per_worker": round(frames / full_s, 1),
        "by_transfer_syntax": {
            ts: {"frames": int(n), "decode_frames_per_s": round(n / s, 1) if s else None,
                 "with_model_input_frames_per_s": round(n / per_ts_full[ts][0], 1)
                 if per_ts_full[ts][0] else None}
            for ts, (s, n) in sorted(per_ts.items())},
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "pydicom": pydicom.__version__, "torch": torch.__version__},
        "note": "one process, best of --repeat; small bundled files, so per-frame overheads dominate",
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
