"""The supervised decode pool survives crashing and hanging decoders."""

from __future__ import annotations

import os
import platform
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
        assert first and second <= first  # no new process: the started ones served both runs
        results = dict(pool.map(square_or_misbehave, [1, 2, 3, 4]))
        assert "crashed" in results[3] and results[4] == 16
        after = set(dict(pool.map(pid_of, range(8))).values())
        assert after and not after & first  # a broken pool is replaced, then works


def page_faults_over_big_buffers(_: int) -> int:
    """Minor page faults while allocating and freeing 64 MB buffers, past glibc's dynamic mmap
    threshold (32 MB at most), once the heap has grown to its working set."""
    import resource

    import torch

    for _ in range(10):
        torch.ones(16 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_decode_workers_reuse_freed_buffers_instead_of_faulting_them_in_again():
    from indexer.pipeline import decode_pool

    with decode_pool(1) as pool:
        [in_decode_worker] = list(pool.map(page_faults_over_big_buffers, [0]))
    with SupervisedPool(lambda item, reason: reason, workers=1, window=1) as plain:
        [in_plain_worker] = list(plain.map(page_faults_over_big_buffers, [0]))
    assert in_plain_worker > 10 * 16000  # each buffer faulted in again, page by page
    assert in_decode_worker < 1000


OWNER = """
import os, sys, time
from indexer.workers import SupervisedPool
pool = SupervisedPool(lambda item, reason: reason, workers=2, window=4).start()
print(" ".join(str(p) for p in pool._executor._processes), flush=True)
time.sleep(600)
"""


def test_workers_end_when_their_owner_is_killed():
    """A kill -9 of an index run or a receiver leaves no worker (nor fork server) behind."""
    import subprocess
    import sys

    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
    workers = [int(pid) for pid in owner.stdout.readline().split()]
    assert len(workers) == 2
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 15
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if _running(pid)]
    assert alive == []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
