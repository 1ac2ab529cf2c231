"""The supervised decode pool survives crashing and hanging decoders."""

from __future__ import annotations

import os
import signal
import time

import pytest

from indexer.workers import SupervisedPool


def square_or_misbehave(item: int) -> tuple[int, object]:
    if item == 3:
        os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder bug in C looks like
    if item == 5:
        time.sleep(60)                         # a decoder stuck on a hostile file
    return item, item * item


def failure(item: int, reason: str) -> tuple[int, object]:
    return item, reason


def test_crash_and_hang_cost_only_their_own_item():
    with SupervisedPool(failure, workers=2, window=4, timeout_s=3) as pool:
        results = dict(pool.map(square_or_misbehave, range(10)))
    assert sorted(results) == list(range(10))
    assert all(results[i] == i * i for i in range(10) if i not in (3, 5))
    assert "crashed" in results[3]
    assert "longer than 3 s" in results[5]


def pid_of(item: int) -> tuple[int, int]:
    return item, os.getpid()


def test_started_pool_is_reused_and_recovers_after_a_crash():
    with SupervisedPool(failure, workers=2, window=4, timeout_s=10) as pool:
        deadline = time.monotonic() + 60
        while pool.start_seconds is None and time.monotonic() < deadline:
            time.sleep(0.05)  # workers start in the background after start()
        assert pool.start_seconds is not None
        first = set(dict(pool.map(pid_of, range(8))).values())
        second = set(dict(pool.map(pid_of, range(8))).values())
        assert first and first == second  # the same processes served both runs
        results = dict(pool.map(square_or_misbehave, [1, 2, 3, 4]))
        assert "crashed" in results[3] and results[4] == 16
        after = set(dict(pool.map(pid_of, range(8))).values())
        assert after and not after & first  # a broken pool is replaced, then works


FAULTS_AFTER_FIRST_BUFFER = """
import resource, sys
import torch
from indexer.workers import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(10):  # 64 MB buffers, past glibc's dynamic mmap threshold (32 MB at most);
    torch.ones(16 << 20)  # meanwhile the heap grows to its working set
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 << 20)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_decode_workers_reuse_freed_buffers_instead_of_faulting_them_in_again():
    import subprocess
    import sys
    from pathlib import Path

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS_AFTER_FIRST_BUFFER, mode],
                             capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout.split()
        return out[0], int(out[1])

    kept, with_reuse = faults("keep")
    if kept == "False":
        pytest.skip("this C library has no glibc mallopt")
    _, without = faults("default")
    assert without > 10 * 16000  # each 64 MB buffer faulted in again, page by page
    assert with_reuse < 1000
