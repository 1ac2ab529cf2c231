"""Device and precision: how a tower runs at the hardware's limit on CPU and CUDA.

CPU: ``auto`` is fp32 unless a short bf16-vs-fp32 matrix product in the tower's MLP shape,
measured once per machine and cached, shows bf16 at least ``BF16_MIN_SPEEDUP``× as fast: CPU
flags (AMX, AVX512-BF16) do not say it (emulated bf16 is always slower than fp32), and the
tower's other operations gain less than its matrix products (``_seq_first_keys`` removes the
one that cost bf16 most). ``auto`` never picks int8, which moves the embedding. ``int8`` =
dynamic int8 quantisation of every Linear layer (weights int8, activations quantised per
batch: 1.78× faster than fp32 on the full-size vision tower on the 2-core reference machine,
cosine 0.9998 to fp32). Thread count: one intra-op thread per core, set deliberately.

CUDA: bf16 as bf16 weights throughout (``cuda_bf16="weights"``, half the bytes for every
elementwise op) or as autocast over fp32 weights (``"autocast"``: reductions and norms in
fp32), SDPA attention, optional ``torch.compile``, batches staged in pinned host memory and
copied asynchronously, batch size from free memory.

Nothing here reads the environment: the cache folder, thread count and CUDA bf16 mode are
parameters, resolved by the caller's settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .cpu_choice import (BF16_MIN_SPEEDUP, CACHE_VERSION, PROBE_SHAPE,  # noqa: F401 - re-exported
                         _read_cache, _record, _write_cache, cache_file, choose_cpu_precision,
                         machine_key)

PRECISIONS = ("auto", "fp32", "bf16", "int8")
#: Activation memory per image for the vision tower in bf16 at 448 px (1024 tokens, width
#: 1152, MLP 4304), with a 2× margin; used to size batches from free GPU memory.
VISION_BYTES_PER_IMAGE = 96 * 2**20
MAX_CUDA_BATCH = 256
#: On CUDA, bf16 as bf16 weights throughout ("weights": half the bytes for every elementwise
#: op) or as autocast over fp32 weights ("autocast": norms and softmax in fp32).
CUDA_BF16_MODES = ("weights", "autocast")
#: The probe alternates fp32 and bf16 products of PROBE_SHAPE for about this long in all.
PROBE_SECONDS = 0.25
#: Probes run in this process (tests tell a cached decision from a fresh one by it, not by time).
measurements = 0
_choices: dict[str, dict] = {}
#: Intra-op threads asked for by the application (None: one per core).
_threads: int | None = None
log = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16 instructions: needed for fast bf16 on x86, but not enough."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def check_cuda_bf16(mode: str) -> str:
    """The CUDA bf16 mode, validated: ``weights`` or ``autocast``."""
    if mode not in CUDA_BF16_MODES:
        raise InputError(f"the CUDA bf16 mode must be one of {', '.join(CUDA_BF16_MODES)}, "
                         f"not {mode!r}")
    return mode


def _probe_seconds(shape: tuple[int, int, int] = PROBE_SHAPE) -> tuple[float, float | None]:
    """Best fp32 and bf16 times of ``x @ W.T + b`` in the tower's MLP shape, alternated so a
    busy neighbour slows both alike; bf16 ``None`` where this build cannot run it."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    args = {torch.float32: (torch.randn(1, m, k, generator=gen), torch.randn(n, k, generator=gen),
                            torch.zeros(n))}
    args[torch.bfloat16] = tuple(t.to(torch.bfloat16) for t in args[torch.float32])
    best = {dtype: float("inf") for dtype in args}
    with torch.inference_mode():
        try:
            torch.nn.functional.linear(*args[torch.bfloat16])  # warm-up: kernel choice, first touch
        except RuntimeError as exc:
            log.debug("bf16 matrix product unavailable: %s", exc)
            del args[torch.bfloat16], best[torch.bfloat16]
        torch.nn.functional.linear(*args[torch.float32])
        spent, rounds = 0.0, 0
        while rounds < 2 or (spent < PROBE_SECONDS and rounds < 8):
            for dtype, operands in args.items():
                start = time.perf_counter()
                torch.nn.functional.linear(*operands)
                elapsed = time.perf_counter() - start
                best[dtype], spent = min(best[dtype], elapsed), spent + elapsed
            rounds += 1
    return best[torch.float32], best.get(torch.bfloat16)


def precision_choice(device: torch.device | str = "cpu", cache_dir: Path | None = None) -> dict:
    """What ``--precision auto`` resolves to on ``device`` and why (logs, ``medsearch info``).

    CPU: measured once per machine (see ``machine_key``) and kept in ``cache_file(cache_dir)``
    (None: no file, remembered in this process only); ``cached`` says whether this answer
    came without a new measurement.
    """
    global measurements
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        return {"device": str(device), "precision": None, "reason": f"unknown device {device!r}"}
    if device.type == "cuda":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return {"device": "cuda", "precision": "bf16" if bf16 else "fp32", "cached": False,
                "reason": "the GPU runs bf16" if bf16 else "no GPU with bf16 visible to torch"}
    if device.type != "cpu":
        return {"device": device.type, "precision": "fp32", "cached": False,
                "reason": "auto picks bf16 only on CUDA or on a CPU measured to gain from it"}
    key = machine_key(configure_cpu_threads())
    if key in _choices:
        return {**_choices[key], "cached": True}
    path = cache_file(cache_dir) if cache_dir is not None else None
    record = _read_cache(path, key) if path else None
    cached = record is not None
    if record is None:
        measurements += 1
        record = _record(*_probe_seconds())
        if path:
            _write_cache(path, key, record)
    record = {"device": "cpu", **record, "machine": key}
    _choices[key] = record
    log.info("--precision auto on this CPU: %s, because %s (fp32 %s, bf16 %s GFLOP/s; %s)",
             record["precision"], record["reason"], record["fp32_gflops"], record["bf16_gflops"],
             "cached" if cached else "measured now")
    return {**record, "cached": cached}


def resolve_precision(precision: str, device: torch.device, cache_dir: Path | None = None) -> str:
    """``auto`` → bf16 on CUDA, and on a CPU where bf16 measured clearly faster; else fp32."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}",
                         setting="precision")
    if precision == "auto":
        return precision_choice(device, cache_dir)["precision"]
    if precision == "int8" and device.type != "cpu":
        raise InputError("precision int8 (dynamic quantisation) runs on the CPU only; "
                         "use bf16 on a GPU")
    return precision


def configure_cpu_threads(threads: int | None = None) -> int:
    """Set ``threads`` intra-op threads; None keeps a count set by an earlier call, else one
    per core (decode workers are separate processes).

    Loading a tower calls this without a count, so a count the application set once (its
    settings) holds for every tower loaded afterwards.
    """
    global _threads
    if threads:
        _threads = int(threads)
    threads = _threads or os.cpu_count() or 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of the Linear layers (the tower's FLOPs are ~all there)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's deprecation notices: the API still works
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _seq_first_keys(module: torch.nn.MultiheadAttention, args: tuple) -> tuple | None:
    """Keys laid out sequence-first in memory before a batch-first MultiheadAttention (SigLIP's
    pooling head) transposes them to T×B×C. On a strided view with B > 1 torch projects them
    as T batched products with the weight expanded T times, materialised in bf16 (a 5.4 GB
    copy): 14–20 s per batch of two at full size on the shared 2-core machine, against 33 s
    for the tower's 27 layers; fp32 2.3 s, int8 1.7 s. On a sequence-first buffer the
    projection is one matrix product (0.3–0.5 s); the values are the same up to summation
    order."""
    if len(args) < 3 or not module.batch_first or args[1] is not args[2] or args[1].dim() != 3:
        return None  # not the pooling head's call: leave it alone
    keys = args[1].transpose(0, 1).contiguous().transpose(0, 1)
    return (args[0], keys, keys, *args[3:])


def prepare_model(model: torch.nn.Module, device: torch.device, precision: str,
                  compile_model: bool = False, *, cuda_bf16: str = "weights") -> torch.nn.Module:
    """Put a loaded tower on its device in its precision (eval mode, no grads)."""
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type == "cpu":
        configure_cpu_threads()
    if precision == "int8":
        model = quantize_int8(model)
    elif precision == "bf16" and (device.type == "cpu" or cuda_bf16 == "weights"):
        model = model.to(torch.bfloat16)  # CPU autocast adds casts per op; native weights are faster
    model = model.to(device)
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):  # SigLIP's pooling head
            module.register_forward_pre_hook(_seq_first_keys)
    if compile_model:
        model = torch.compile(model, dynamic=False)
    return model


def autocast(device: torch.device, precision: str, cuda_bf16: str = "weights"):
    """bf16 autocast on CUDA in autocast mode; nothing elsewhere (bf16 weights need none)."""
    if device.type == "cuda" and precision == "bf16" and cuda_bf16 == "autocast":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def input_dtype(device: torch.device, precision: str, cuda_bf16: str = "weights") -> torch.dtype:
    """The dtype a batch enters the tower in: bf16 where the weights are bf16."""
    weights = device.type == "cpu" or cuda_bf16 == "weights"
    return torch.bfloat16 if precision == "bf16" and weights else torch.float32


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device; on CUDA through pinned memory with an asynchronous copy."""
    if device.type != "cuda":
        return batch
    if not batch.is_pinned():
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def stack_planes(arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """One batch from per-image model planes, in page-locked memory when the target is a GPU.

    A batch of grey images stays one plane per image (N×1×S×S; the encoder copies it to three
    channels on its device), so the host copies and the bus carries a third of the bytes; a
    batch with colour is N×3×S×S. The copy is numpy's, on the calling thread: torch's parallel
    ``copy_`` waited for cores the decode workers kept busy (7 ms per image measured on 2
    busy cores, against 1 ms), which capped the GPU pipeline near 100 images/s.
    """
    channels = 1 if all(a.shape[0] == 1 for a in arrays) else 3
    out = torch.empty((len(arrays), channels, *arrays[0].shape[1:]), dtype=torch.float32,
                      pin_memory=device.type == "cuda")
    view = out.numpy()
    for i, a in enumerate(arrays):
        view[i] = a  # in a colour batch, grey planes broadcast to three channels
    return out


def auto_batch_size(device: torch.device, requested: int | None = None,
                    bytes_per_image: int = VISION_BYTES_PER_IMAGE) -> int:
    """The requested size, or on CUDA the largest power of two that fits half the free memory."""
    if requested:
        return requested
    if device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(device)
    fits = max(1, int(free * 0.5 // bytes_per_image))
    return int(min(MAX_CUDA_BATCH, 2 ** int(np.log2(fits))))
