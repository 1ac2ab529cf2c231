"""The local engine: walk → decode in worker processes → embed in batches → commit.

Each batch is one SQLite transaction holding whole files (all their frames), so a run killed
at any point resumes without duplicates: committed files count as unchanged next time. What
any engine shares (the plan, routing, writes) is in :mod:`indexer.ingest`; the Ray engine is
:mod:`indexer.ray_engine`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from functools import partial
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from retrieval import privacy
from retrieval.model.acceleration import stack_planes
from retrieval.model import VisionEncoder
from retrieval.store import Store

from .decode import Decoded, decode_source
from .ingest import IndexReport, IndexRun, Plan
from .sources import SourceFile
from .workers import SupervisedPool, keep_freed_memory

__all__ = ["Indexer", "IndexReport", "decode_pool", "default_workers",
           "query_image_vector"]


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _init_worker() -> None:
    torch.set_num_threads(1)  # one decode per process; the encoder owns the other cores
    keep_freed_memory()


def decode_pool(workers: int | None = None, *, timeout_s: float = 300.0) -> SupervisedPool:
    """Decode workers, not yet started: call ``start()`` before loading the model so their
    start-up (each imports torch and the decoders) overlaps it."""
    workers = default_workers() if workers is None else workers
    return SupervisedPool(_failed, workers=workers, window=max(4, workers * 4),
                          timeout_s=timeout_s, initializer=_init_worker,
                          preload=("__main__", "indexer.decode"))


def _failed(source: SourceFile, reason: str) -> Decoded:
    return Decoded(source, error=reason)


class Indexer(IndexRun):
    """Index paths into a store with a vision encoder on this machine; one instance per run."""

    def __init__(self, store: Store, encoder: VisionEncoder, *, workers: int | None = None,
                 batch_size: int = 8, frames: str = "middle", phi_policy: str = "hash",
                 progress: bool | None = None, window: str = "file",
                 series_vectors: bool = False, pacs_query=None, pacs=None,
                 decode_timeout_s: float = 300.0, pool: SupervisedPool | None = None,
                 keys: privacy.KeyFiles | None = None) -> None:
        """``pool``: decode workers started earlier (see :func:`decode_pool`), left open for the
        caller to close; without one, the indexer starts its own now and closes it in
        :meth:`close`. ``workers=0`` decodes in this process. ``keys``: where the patient-key
        files are (the settings' key folder and shared key file)."""
        super().__init__(store, image_size=encoder.image_size, batch_size=batch_size,
                         frames=frames, phi_policy=phi_policy, progress=progress, window=window,
                         series_vectors=series_vectors, pacs_query=pacs_query, pacs=pacs,
                         keys=keys)
        self.encoder = encoder
        self.workers = pool.workers if pool else default_workers() if workers is None else workers
        self._encoder_thread: ThreadPoolExecutor | None = None
        self._pending: tuple | None = None  # (vectors future, batch, ops) being embedded
        self._own_pool = pool is None and self.workers > 0
        self.pool = (decode_pool(self.workers, timeout_s=decode_timeout_s).start()
                     if self._own_pool else pool)

    def close(self) -> None:
        """Stop the decode workers this indexer started."""
        if self._own_pool and self.pool is not None:
            self.pool.close()
            self.pool = None

    # -- decoding ---------------------------------------------------------------------------
    def _decoded(self, sources: list[SourceFile]) -> Iterator[Decoded]:
        """Decode in worker processes with a bounded window, so memory stays flat."""
        if self.pool is None:
            for source in sources:
                yield decode_source(source, self.options)
            return
        yield from self.pool.map(partial(decode_source, options=self.options), sources,
                                 window=max(self.pool.window, self.batch_size * 2))

    # -- the run ----------------------------------------------------------------------------
    def _stream(self, plan: Plan, report: IndexReport, bar: tqdm, started: float) -> None:
        batch: list[Decoded] = []
        ops: list[tuple] = []  # touches, renames and failures, written with the next batch
        for decoded in self._decoded(plan.todo):
            bar.update(1)
            self._route(decoded, plan, batch, ops, report)
            if self._due(batch, ops, self.batch_size):
                self._commit(batch, ops, report)
                batch, ops = [], []
                self._after_write(report, bar, started)
        self._commit(batch, ops, report)
        self._flush(report)

    def _stop(self) -> None:
        if self._encoder_thread is not None:
            self._encoder_thread.shutdown(wait=True, cancel_futures=True)
            self._encoder_thread, self._pending = None, None

    def _commit(self, batch: list[Decoded], ops: list[tuple], report: IndexReport) -> None:
        """Start embedding the batch on the encoder thread, then write the previous batch.

        One batch in flight: the device computes batch i+1 while batch i is written and the
        workers decode more, so neither waits for the other. Each batch is still one
        transaction; a killed run loses at most the batch in flight (redone next run).
        """
        if not batch and not ops:
            return
        if self._encoder_thread is None:
            self._encoder_thread = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        future = self._encoder_thread.submit(
            self._embed, [frame.planes for d in batch for frame in d.frames])
        self._flush(report)
        self._pending = (future, batch, ops)

    def _flush(self, report: IndexReport) -> None:
        """Write the batch in flight, if any."""
        if self._pending is not None:
            future, batch, ops = self._pending
            self._pending = None
            self._write(future.result(), batch, ops, report)

    def _embed(self, tensors: list[np.ndarray]) -> np.ndarray:
        if not tensors:
            return np.zeros((0, self.store.dim), np.float32)
        out = []
        for start in range(0, len(tensors), self.batch_size):
            chunk = stack_planes(tensors[start:start + self.batch_size], self.encoder.device)
            out.append(self.encoder.embed_batch(chunk))
        return np.concatenate(out)


def query_image_vector(encoder: VisionEncoder, file: str | Path,
                       decode: dict | None = None, region=None) -> np.ndarray:
    """Embed a query file decoded as the store's images were (``decode``: its manifest's
    recorded settings, None for the defaults), or only a ``region`` (retrieval.region) of it."""
    from .view import DecodeSettings, read_image

    image = read_image(file, image_size=encoder.image_size,
                       settings=DecodeSettings.from_manifest(decode).for_query(), region=region)
    return encoder.embed_batch(torch.from_numpy(image.tensor[None]))[0]
