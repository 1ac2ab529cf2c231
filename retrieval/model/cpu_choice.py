"""The CPU precision decision cached per machine (``--precision auto``), readable without
importing torch: ``medsearch info`` shows it on every run, and most runs load no model.

The measurement itself (retrieval.model.acceleration) needs torch; its result is kept in
``precision.json`` in the cache folder keyed by :func:`machine_key`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path

#: ``auto`` takes bf16 on a CPU only when its matrix products measure this much faster than
#: fp32: the probe times products alone, and the tower's other ops gain less from bf16.
BF16_MIN_SPEEDUP = 1.25
#: The probe: tokens × width → MLP width, the vision tower's largest product (a quarter of a
#: 448-px image's 1024 tokens), alternating fp32 and bf16.
PROBE_SHAPE = (256, 1152, 4304)
CACHE_VERSION = 1
#: Device files of a GPU that torch could see (NVIDIA, ROCm, WSL): with none, ``auto`` is the CPU.
GPU_DEVICE_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
log = logging.getLogger("retrieval.model.acceleration")


def torch_version() -> str:
    """torch's version, without importing it when it is not imported yet."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return str(torch.__version__)
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        import torch

        return str(torch.__version__)


def gpu_may_be_visible() -> bool:
    """Whether torch might see a GPU here; False only when no GPU device file exists at all."""
    return any(Path(p).exists() for p in GPU_DEVICE_FILES)


def cached_choice(device: str, cache_dir: Path | None, threads: int | None) -> dict | None:
    """What ``precision_choice`` answers on a CPU whose decision is already cached, found
    without torch; None when answering needs torch (another device, a GPU may be visible to
    ``auto``, or nothing cached for this machine yet)."""
    if device not in ("auto", "cpu") or cache_dir is None:
        return None
    if device == "auto" and gpu_may_be_visible():
        return None
    key = machine_key(threads or os.cpu_count() or 1)
    record = _read_cache(cache_file(cache_dir), key)
    if record is None:
        return None
    return {"device": "cpu", **record, "machine": key, "cached": True}


def precision_auto(device: str, cache_dir: Path | None, threads: int | None) -> dict:
    """What ``--precision auto`` picks on ``device`` and why: the cached decision when there is
    one (no torch), else ``acceleration.precision_choice`` (imports torch, may measure)."""
    found = cached_choice(device, cache_dir, threads)
    if found is not None:
        return found
    from .acceleration import configure_cpu_threads, precision_choice

    configure_cpu_threads(threads)
    return precision_choice(device, cache_dir=cache_dir)


def cache_file(cache_dir: Path) -> Path:
    """The per-machine precision decisions inside the cache folder."""
    return Path(cache_dir) / "precision.json"


def machine_key(threads: int) -> str:
    """What the probe's result depends on: CPU model, its bf16-related flags, torch, threads."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                name, _, value = (part.strip() for part in line.partition(":"))
                if name == "model name":
                    model = value
                elif name in ("flags", "Features"):  # x86, ARM
                    flags.update(value.split())
                elif not name and flags:
                    break  # the first processor's block is enough
    except OSError:
        from .acceleration import cpu_has_native_bf16  # no /proc: ask torch itself

        flags.update(["native_bf16"] if cpu_has_native_bf16() else [])
    relevant = " ".join(sorted(f for f in flags if "bf16" in f or f.startswith("amx")
                               or f == "avx512f")) or "no bf16 flags"
    return f"{model} | {relevant} | torch {torch_version()} | {threads} threads"


def choose_cpu_precision(fp32_seconds: float, bf16_seconds: float | None,
                         min_speedup: float = BF16_MIN_SPEEDUP) -> tuple[str, str]:
    """(precision, why) from measured times: bf16 only when ≥ ``min_speedup``× faster than fp32."""
    if not bf16_seconds or bf16_seconds <= 0:
        return "fp32", "bf16 matrix products do not run on this CPU"
    speedup = fp32_seconds / bf16_seconds
    if speedup >= min_speedup:
        return "bf16", (f"bf16 matrix products {speedup:.2f}× as fast as fp32 here "
                        f"(≥ {min_speedup}× needed)")
    return "fp32", (f"bf16 matrix products only {speedup:.2f}× as fast as fp32 here "
                    f"(< {min_speedup}× needed)")


def _record(fp32_seconds: float, bf16_seconds: float | None) -> dict:
    """The decision and its evidence, as cached and as ``info`` shows it."""
    precision, reason = choose_cpu_precision(fp32_seconds, bf16_seconds)
    flops = 2 * PROBE_SHAPE[0] * PROBE_SHAPE[1] * PROBE_SHAPE[2]
    return {"precision": precision, "reason": reason,
            "fp32_gflops": round(flops / fp32_seconds / 1e9, 1),
            "bf16_gflops": round(flops / bf16_seconds / 1e9, 1) if bf16_seconds else None,
            "fp32_seconds": fp32_seconds, "bf16_seconds": bf16_seconds,
            "probe_shape": list(PROBE_SHAPE)}


def _read_cache(path: Path, key: str) -> dict | None:
    """The cached record for this machine, its decision re-derived from its own timings."""
    try:
        entry = json.loads(path.read_text())["machines"][key]
        fp32, bf16 = float(entry["fp32_seconds"]), entry["bf16_seconds"]
        if list(entry["probe_shape"]) != list(PROBE_SHAPE) or not fp32 > 0:
            raise ValueError("another probe or a non-positive time")
        return _record(fp32, None if bf16 is None else float(bf16))
    except FileNotFoundError:
        return None
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        log.debug("precision cache %s not usable for this machine (%r); measuring", path, exc)
        return None


def _write_cache(path: Path, key: str, record: dict) -> None:
    """Add this machine's record (others kept), atomically; any failure only costs a re-measure."""
    try:
        try:
            doc = json.loads(path.read_text())
            machines = doc["machines"] if isinstance(doc.get("machines"), dict) else {}
        except (OSError, ValueError, AttributeError):
            machines = {}
        machines[key] = {k: record[k] for k in ("precision", "reason", "fp32_gflops", "bf16_gflops",
                                                 "fp32_seconds", "bf16_seconds", "probe_shape")}
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".precision-", suffix=".tmp",
                                         delete=False) as tmp:
            json.dump({"version": CACHE_VERSION, "machines": machines}, tmp, indent=1)
        os.replace(tmp.name, path)
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        log.debug("precision cache %s not written (%r)", path, exc)
        with contextlib.suppress(OSError, NameError):
            os.unlink(tmp.name)
