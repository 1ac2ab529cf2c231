"""A supervised process pool for decoding: a crash or hang costs one file, never the run.

A decoder can segfault or loop forever on a hostile file. The pool then breaks (or the task
overruns its time); every file that was in flight is retried alone in a fresh pool, and only
the one that breaks or overruns again is reported as failed.

Starting workers costs seconds (each imports torch and the decoders), so a pool can be started
early — while the model loads — and reused by every ``map`` until it is closed.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
#: How often overrun clocks are checked (and the longest wait for a result between checks).
CHECK_EVERY_S = 1.0


def _start_worker(owner: int, initializer: Callable[[], None] | None) -> None:
    """Run in each worker first: end the worker when the process that owns the pool is gone.

    A pool's workers are children of the fork server, not of their owner, and wait on a queue
    whose write end they hold themselves: an owner killed with SIGKILL (a kill -9 during an
    index run, a receiver killed mid-push) would leave them, and the fork server, for ever.
    """
    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:  # the pid was reused by another user's process
                os._exit(0)

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()
    if initializer is not None:
        initializer()


def keep_freed_memory(limit: int = 256 << 20) -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the kernel.

    A decode allocates and frees image-sized buffers (8–64 MB) for every file. Past glibc's
    mmap threshold each one is a fresh mapping whose pages fault in, zeroed, on first touch:
    ~3,700 page faults and ~18 ms of kernel time per file of the benchmark corpus, a quarter
    of the decode. With both thresholds at ``limit`` such buffers come from the heap and are
    reused, and a heap with more than ``limit`` free at its top is still trimmed. Returns False
    where the C library has no glibc ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, limit)) and bool(mallopt(m_trim_threshold, limit))


def _ready() -> int:
    return os.getpid()


class SupervisedPool:
    """Map functions over items in worker processes, yielding results as they finish.

    ``on_failure(item, reason)`` turns a crashed or timed-out item into a result.
    ``preload`` modules are imported once by the fork server, so workers start with them.
    """

    def __init__(self, on_failure: Callable[[T, str], R], *, workers: int, window: int,
                 timeout_s: float = 300.0, initializer: Callable[[], None] | None = None,
                 preload: tuple[str, ...] = ()) -> None:
        self.on_failure = on_failure
        self.workers, self.window, self.timeout_s = max(1, workers), window, timeout_s
        self.initializer = initializer
        self.context = multiprocessing.get_context("forkserver")
        if preload:  # only takes effect if the fork server is not running yet
            self.context.set_forkserver_preload(list(preload))
        self._executor: ProcessPoolExecutor | None = None
        self._warming: list[Future] = []
        self.start_seconds: float | None = None  # start() until every worker was ready

    # -- lifetime ---------------------------------------------------------------------------
    def start(self) -> "SupervisedPool":
        """Spawn every worker now, without waiting for them (they import while the caller works)."""
        if self._executor is None:
            begun = time.perf_counter()
            self._executor = self._pool(self.workers)
            # one task per worker: the executor spawns a process for each task it cannot
            # hand to an idle worker, so all of them start (and run the initializer) now
            self._warming = [self._executor.submit(_ready) for _ in range(self.workers)]
            for future in self._warming:
                future.add_done_callback(lambda _f, b=begun: self._mark_ready(b))
        return self

    def _mark_ready(self, begun: float) -> None:
        if all(f.done() for f in self._warming):
            self.start_seconds = round(time.perf_counter() - begun, 3)

    def close(self) -> None:
        if self._executor is not None:
            _shutdown(self._executor, kill=False)
            self._executor = None

    def __enter__(self) -> "SupervisedPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=self.context, initializer=_start_worker,
                                   initargs=(os.getpid(), self.initializer))

    # -- work -------------------------------------------------------------------------------
    def map(self, func: Callable[[T], R], items: Iterable[T], window: int | None = None) -> Iterator[R]:
        """Results of ``func`` over ``items`` in completion order; at most ``window`` in flight."""
        todo: deque = deque(items)
        suspects: deque = deque()
        window = max(1, window or self.window)
        while todo or suspects:
            if suspects:
                yield self._run_alone(func, suspects.popleft())
                continue
            yield from self._run_batch(func, todo, suspects, window)

    def _run_batch(self, func: Callable[[T], R], todo: deque, suspects: deque,
                   window: int) -> Iterator[R]:
        """Run until the queue is empty or the pool breaks (then in-flight items become suspects).

        Finished futures arrive through a queue their done-callbacks feed, and the overrun
        clocks are checked about once a second: waiting on every future in flight for each
        result cost O(window) lock operations per file (a 512-file window on a GPU host).
        """
        pool = self.start()._executor
        running: dict[Future, tuple] = {}
        finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
        broken, next_check = False, 0.0
        try:
            while todo or running:
                while todo and len(running) < window:
                    item = todo.popleft()
                    try:
                        future = pool.submit(func, item)
                    except BrokenProcessPool:  # broke while idle (a worker was killed)
                        todo.appendleft(item)
                        broken = True
                        break
                    running[future] = (item, None)
                    future.add_done_callback(finished.put)
                if broken and not running:
                    return
                done = _drain(finished, timeout=min(self.timeout_s, CHECK_EVERY_S))
                for future in done:
                    item, _ = running.pop(future)
                    try:
                        yield future.result()
                    except BrokenProcessPool:
                        suspects.append(item)
                        broken = True
                now = time.monotonic()
                if not broken and now >= next_check:
                    # Start the clock only once a task is running (queued tasks are not late).
                    for future, (item, started) in list(running.items()):
                        if started is None and future.running():
                            running[future] = (item, now)
                        elif started is not None and now - started > self.timeout_s:
                            broken = True
                    next_check = now + CHECK_EVERY_S
                if broken:
                    suspects.extend(item for item, _ in running.values())
                    running.clear()
                    return
        finally:
            for future in running:  # the consumer stopped early: drop what has not started
                future.cancel()
            if broken:  # the next batch gets fresh workers
                _shutdown(pool, kill=True)
                self._executor = None

    def _run_alone(self, func: Callable[[T], R], item: T) -> R:
        """One item in its own process: a crash or overrun now surely belongs to it."""
        pool = self._pool(1)
        future = pool.submit(func, item)
        try:
            return future.result(timeout=self.timeout_s)
        except BrokenProcessPool:
            _shutdown(pool, kill=True)
            return self.on_failure(item, "the decoder crashed on this file (worker process died)")
        except TimeoutError:
            _shutdown(pool, kill=True)
            return self.on_failure(item, f"decoding took longer than {self.timeout_s:.0f} s "
                                         "(raise the decode timeout if the file is just very large)")
        finally:
            _shutdown(pool, kill=False)


def _drain(finished: queue.SimpleQueue, timeout: float) -> list[Future]:
    """The futures finished so far, waiting up to ``timeout`` for the first."""
    try:
        done = [finished.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            done.append(finished.get_nowait())
        except queue.Empty:
            return done


def _shutdown(pool: ProcessPoolExecutor, *, kill: bool) -> None:
    if kill:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            try:
                os.kill(process.pid, signal.SIGKILL)
            except (ProcessLookupError, AttributeError):
                pass
    pool.shutdown(wait=True, cancel_futures=True)
