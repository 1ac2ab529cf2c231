"""What a benchmark ran on: the CPU model and the instruction-set flags that decide its figures.

Machines of one kind differ (an AVX2 Zen 3 one session, AVX-512 with VNNI/BF16 and no AMX the
next), so every JSON a benchmark prints carries this next to its figures.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: Flags that change what the CPU paths can do (GEMM width, int8 dot products, bf16, tiles).
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                  "amx_bf16", "amx_int8")


def cpu() -> dict:
    """{"model", "cores", "flags"} of this machine (flags: the relevant ones it has)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "flags": [f for f in RELEVANT_FLAGS if f in flags]}
