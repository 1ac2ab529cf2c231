"""A supervised process pool for decoding: a crash or hang costs one file, never the run.

A decoder can segfault or loop forever on a hostile file. The pool then breaks (or the task
overruns its time); every file that was in flight is retried alone in a fresh pool, and only
the one that breaks or overruns again is reported as failed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class SupervisedPool:
    """Map ``func`` over items in worker processes, yielding results as they finish.

    ``on_failure(item, reason)`` turns a crashed or timed-out item into a result.
    """

    def __init__(self, func: Callable[[T], R], on_failure: Callable[[T, str], R], *,
                 workers: int, window: int, timeout_s: float = 300.0,
                 initializer: Callable[[], None] | None = None) -> None:
        self.func, self.on_failure = func, on_failure
        self.workers, self.window, self.timeout_s = workers, window, timeout_s
        self.initializer = initializer
        self.context = multiprocessing.get_context("forkserver")

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=self.context, initializer=self.initializer)

    def map(self, items: Iterable[T]) -> Iterator[R]:
        todo: deque = deque(items)
        suspects: deque = deque()
        while todo or suspects:
            if suspects:
                yield self._run_alone(suspects.popleft())
                continue
            yield from self._run_batch(todo, suspects)

    def _run_batch(self, todo: deque, suspects: deque) -> Iterator[R]:
        """Run until the queue is empty or the pool breaks (then in-flight items become suspects)."""
        pool = self._pool(self.workers)
        running: dict[Future, tuple] = {}
        broken = False
        try:
            while todo or running:
                while todo and len(running) < self.window:
                    item = todo.popleft()
                    running[pool.submit(self.func, item)] = (item, None)
                done, _ = wait(running, timeout=min(self.timeout_s, 5.0),
                               return_when=FIRST_COMPLETED)
                now = time.monotonic()
                for future in done:
                    item, _ = running.pop(future)
                    try:
                        yield future.result()
                    except BrokenProcessPool:
                        suspects.append(item)
                        broken = True
                # Start the clock only once a task is running (queued tasks are not late).
                for future, (item, started) in list(running.items()):
                    if started is None and future.running():
                        running[future] = (item, now)
                    elif started is not None and now - started > self.timeout_s:
                        broken = True
                if broken:
                    suspects.extend(item for item, _ in running.values())
                    running.clear()
                    return
        finally:
            _shutdown(pool, kill=broken)

    def _run_alone(self, item: T) -> R:
        """One item in its own process: a crash or overrun now surely belongs to it."""
        pool = self._pool(1)
        future = pool.submit(self.func, item)
        try:
            return future.result(timeout=self.timeout_s)
        except BrokenProcessPool:
            _shutdown(pool, kill=True)
            return self.on_failure(item, "the decoder crashed on this file (worker process died)")
        except TimeoutError:
            _shutdown(pool, kill=True)
            return self.on_failure(item, f"decoding took longer than {self.timeout_s:.0f} s "
                                         "(raise --decode-timeout if the file is just very large)")
        finally:
            _shutdown(pool, kill=False)


def _shutdown(pool: ProcessPoolExecutor, *, kill: bool) -> None:
    if kill:
        for process in list(getattr(pool, "_processes", {}).values()):
            try:
                os.kill(process.pid, signal.SIGKILL)
            except (ProcessLookupError, AttributeError):
                pass
    pool.shutdown(wait=True, cancel_futures=True)
