"""The supervised decode pool survives crashing and hanging decoders."""

from __future__ import annotations

import os
import signal
import time

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
    pool = SupervisedPool(square_or_misbehave, failure, workers=2, window=4, timeout_s=3)
    results = dict(pool.map(range(10)))
    assert sorted(results) == list(range(10))
    assert all(results[i] == i * i for i in range(10) if i not in (3, 5))
    assert "crashed" in results[3]
    assert "longer than 3 s" in results[5]
