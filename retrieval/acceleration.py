"""Device and precision: how a tower runs at the hardware's limit on CPU and CUDA.

CPU: fp32 by default; ``int8`` = dynamic int8 quantisation of every Linear layer (weights int8,
activations quantised per batch: 1.78× faster than fp32 on the full-size vision tower on the
2-core reference machine, cosine 0.9998 to fp32); bf16 only where the processor has native
bf16 (AMX / AVX512-BF16) — elsewhere it is emulated and slower than fp32 (9.5 s vs 4.0 s per
image measured). Thread count: one intra-op thread per core, set deliberately.

CUDA: bf16 autocast (fp32 weights, matrix products in bf16, reductions and norms in fp32),
SDPA attention, optional ``torch.compile``, batches staged in pinned host memory and copied
asynchronously, pixel scaling/resizing on the device, batch size from free memory.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch

from .errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "int8")
#: Activation memory per image for the vision tower in bf16 at 448 px (1024 tokens, width
#: 1152, MLP 4304), with a 2× margin; used to size batches from free GPU memory.
VISION_BYTES_PER_IMAGE = 96 * 2**20
MAX_CUDA_BATCH = 256
#: On CUDA, bf16 as autocast over fp32 weights ("autocast": norms and softmax in fp32) or as
#: bf16 weights throughout ("weights": half the bytes for every elementwise op).
CUDA_BF16_MODE = os.environ.get("MEDSEARCH_CUDA_BF16", "weights")


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16: bf16 matrix products faster than fp32 on this CPU."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA (and on CPUs with native bf16), else fp32; checks the rest."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise InputError("--precision int8 (dynamic quantisation) runs on the CPU only; "
                         "use bf16 on a GPU")
    return precision


def configure_cpu_threads(threads: int | None = None) -> int:
    """One intra-op thread per core (decode workers are separate processes)."""
    threads = threads or int(os.environ.get("MEDSEARCH_THREADS", 0)) or (os.cpu_count() or 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of the Linear layers (the tower's FLOPs are ~all there)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's deprecation notices: the API still works
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def prepare_model(model: torch.nn.Module, device: torch.device, precision: str,
                  compile_model: bool = False) -> torch.nn.Module:
    """Put a loaded tower on its device in its precision (eval mode, no grads)."""
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device.type == "cpu":
        configure_cpu_threads()
    if precision == "int8":
        model = quantize_int8(model)
    elif precision == "bf16" and (device.type == "cpu" or CUDA_BF16_MODE == "weights"):
        model = model.to(torch.bfloat16)  # CPU autocast adds casts per op; native weights are faster
    model = model.to(device)
    if compile_model:
        model = torch.compile(model, dynamic=False)
    return model


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA; nothing elsewhere (CPU bf16 uses bf16 weights directly)."""
    if device.type == "cuda" and precision == "bf16" and CUDA_BF16_MODE == "autocast":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def input_dtype(device: torch.device, precision: str) -> torch.dtype:
    weights = device.type == "cpu" or CUDA_BF16_MODE == "weights"
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


def device_model_input(pixels: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """The MedSigLIP recipe (scale by bit depth, grey→RGB, centred pad, bilinear resize
    without antialiasing, [-1, 1]) computed on ``device``: only the raw pixels cross the bus."""
    from .preprocess import pad_to_square, resize_square, to_rgb

    if pixels.dtype == np.uint8:
        scale = 255.0
    elif pixels.dtype == np.uint16:
        scale = 65535.0
    else:
        from .preprocess import model_input

        return model_input(pixels, size).to(device)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    grey = pixels.shape[2] in (1, 2)
    raw = np.ascontiguousarray(pixels[:, :, :1] if grey else to_rgb(pixels))
    host = torch.from_numpy(raw.astype(np.int32) if raw.dtype == np.uint16 else raw)
    chw = to_device(host, device).permute(2, 0, 1).to(torch.float64) / scale
    square = resize_square(pad_to_square(chw), size)
    if grey:
        square = square.expand(3, -1, -1)
    return (square * 2.0 - 1.0).to(torch.float32)
