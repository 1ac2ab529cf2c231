"""The ingestion pipeline: walk → decode in worker processes → embed in batches → commit.

Each batch is one SQLite transaction holding whole files (all their frames), so a run killed
at any point resumes without duplicates: committed files count as unchanged next time.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from functools import partial
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from retrieval import privacy
from retrieval.model.acceleration import stack_planes
from retrieval.model import VisionEncoder
from retrieval.store import NewFile, NewImage, Store

from .decode import Decoded, DecodeOptions, decode_source
from .dicomdir import expand_dicomdirs, is_dicomdir_path
from .dicomweb import is_dicomweb, list_instances, removal_allowed
from .sources import SourceFile, Walker, under_any
from .workers import SupervisedPool, keep_freed_memory

#: Save the FAISS file at least this often during long runs (the DB is committed per batch).
SAVE_EVERY_S = 300.0


@dataclass
class IndexReport:
    """The outcome of one run; ``to_json`` is the `medsearch index --json` contract."""

    indexed: int = 0
    unchanged: int = 0
    removed: int = 0
    renamed: int = 0
    failed: int = 0
    images: int = 0
    total: int = 0
    failures: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    series: int = 0   # series-level vectors written (--series-vectors)
    #: what the walk could not read (folders, files whose stat failed): {root, path, reason}
    warnings: list[dict] = field(default_factory=list)
    #: roots whose missing files were NOT removed, and why: {root, reason}
    prune_skipped: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["images_per_s"] = round(self.images / self.seconds, 3) if self.seconds else 0.0
        return out


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


class Indexer:
    """Index paths into a store with a vision encoder; one instance per run."""

    def __init__(self, store: Store, encoder: VisionEncoder, *, workers: int | None = None,
                 batch_size: int = 8, frames: str = "middle", phi_policy: str = "hash",
                 progress: bool | None = None, window: str = "file",
                 series_vectors: bool = False, dicomweb_query=None,
                 decode_timeout_s: float = 300.0, pool: SupervisedPool | None = None,
                 keys: privacy.KeyFiles | None = None) -> None:
        """``pool``: decode workers started earlier (see :func:`decode_pool`), left open for the
        caller to close; without one, the indexer starts its own now and closes it in
        :meth:`close`. ``workers=0`` decodes in this process. ``keys``: where the patient-key
        files are (the settings' key folder and shared key file)."""
        self.store, self.encoder = store, encoder
        self.workers = pool.workers if pool else default_workers() if workers is None else workers
        self.batch_size = max(1, batch_size)
        self.progress = progress
        # the key file (retrieval.privacy), never a secret inside the store; needed to hash
        # patient keys and to keep withdrawn patients and studies out
        self.withdrawn = privacy.withdrawn_markers(store)
        secret = privacy.store_key(store, create=True, keys=keys,
                                   required=phi_policy == "hash" or bool(self.withdrawn))
        self.options = DecodeOptions(image_size=encoder.image_size, frames=frames,
                                     phi_policy=phi_policy, phi_secret=secret or b"",
                                     window=window)
        self.series_vectors, self.dicomweb_query = series_vectors, dicomweb_query
        self.touched_series: set[str] = set()
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

    def __enter__(self) -> "Indexer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
    def run(self, roots: Iterable[str | Path]) -> IndexReport:
        started = time.perf_counter()
        roots = list(roots)
        web_roots = [str(r).rstrip("/") for r in roots if is_dicomweb(str(r))]
        roots = [str(Path(r).expanduser().absolute()) for r in roots
                 if not is_dicomweb(str(r))] + web_roots
        report = IndexReport()
        walker = Walker()
        sources = list(expand_dicomdirs(walker.walk(r for r in roots if r not in web_roots)))
        report.warnings = [p.to_json() for p in walker.problems]
        report.prune_skipped = [{"root": r, "reason": why} for r, why in walker.unsafe.items()]
        for web_root in web_roots:  # a PACS: QIDO-RS lists its instances
            sources += list_instances(web_root, self.dicomweb_query)
        report.total = len(sources)
        known = self.store.known_files(roots)
        todo = [s for s in sources if known.get(s.path, (None, None))[:2] != (s.size, s.mtime_ns)]
        report.unchanged = report.total - len(todo)
        # a file we could not stat is kept; an unreadable or empty root prunes nothing
        seen = {s.path for s in sources} | set(walker.unreadable_files)
        gone = {path: digest for path, (_, _, digest) in known.items()
                if path not in seen and not under_any(path, walker.unsafe)
                and removal_allowed(path, self.dicomweb_query)}
        gone_by_hash = {digest: path for path, digest in gone.items()}
        # files a DICOMDIR given directly references lie beside it, outside the walked roots
        beside = [str(Path(r).parent) for r in roots if Path(r).is_file() and is_dicomdir_path(r)]
        if beside:
            known.update(self.store.known_files(beside))

        batch: list[Decoded] = []
        ops: list[tuple] = []  # touches, renames and failures, written with the next batch
        last_save = time.monotonic()
        bar = tqdm(total=len(todo), unit="file", file=sys.stderr, dynamic_ncols=True,
                   disable=(not self.progress) if self.progress is not None else None)
        try:
            for decoded in self._decoded(todo):
                bar.update(1)
                self._route(decoded, known, gone, gone_by_hash, batch, ops, report)
                if sum(len(d.frames) for d in batch) >= self.batch_size or len(ops) >= 256:
                    self._commit(batch, ops, report)
                    batch, ops = [], []
                    elapsed = time.perf_counter() - started
                    bar.set_postfix_str(f"{report.images / elapsed:.2f} img/s")
                    if time.monotonic() - last_save > SAVE_EVERY_S:
                        self.store.maintain_index()
                        self.store.save()
                        last_save = time.monotonic()
            self._commit(batch, ops, report)
            self._flush(report)
            if gone:
                with self.store.writer() as writer:
                    for path in gone:
                        writer.remove_file(path)
                        writer.clear_failure(path)
                report.removed = len(gone)
            if self.series_vectors:
                from .series import stale_series, update_series_vectors

                report.series = update_series_vectors(
                    self.store, self.touched_series | set(stale_series(self.store)))
        finally:
            if self._encoder_thread is not None:
                self._encoder_thread.shutdown(wait=True, cancel_futures=True)
                self._encoder_thread, self._pending = None, None
            bar.close()
            self.store.maintain_index()
            self.store.save()
        report.seconds = round(time.perf_counter() - started, 3)
        return report

    def _route(self, decoded: Decoded, known: dict, gone: dict, gone_by_hash: dict,
               batch: list, ops: list, report: IndexReport) -> None:
        path = decoded.source.path
        if decoded.error:
            ops.append(("fail", path, decoded.error))
            report.failed += 1
            report.failures.append({"path": path, "reason": decoded.error})
        elif decoded.skipped:
            ops.append(("skip", path, decoded.skipped))
            report.skipped.append({"path": path, "reason": decoded.skipped})
        elif privacy.withdrawn(self.withdrawn, self.options.phi_secret, decoded.consent_key,
                               decoded.metadata.get("study_uid")):  # `medsearch forget`
            ops.append(("withdrawn", path))
            report.skipped.append({"path": path, "reason": "withdrawn"})
        elif path in known and known[path][2] == decoded.content_hash:
            ops.append(("touch", decoded.source))
            report.unchanged += 1
        elif path not in known and decoded.content_hash in gone_by_hash:
            old = gone_by_hash.pop(decoded.content_hash)
            gone.pop(old, None)
            ops.append(("rename", old, decoded.source))
            report.renamed += 1
        else:
            batch.append(decoded)

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

    def _write(self, vectors: np.ndarray, batch: list[Decoded], ops: list[tuple],
               report: IndexReport) -> None:
        """Write embedded files and the pending ops in one transaction."""
        with self.store.writer() as writer:
            for op in ops:
                if op[0] in ("fail", "skip"):
                    writer.remove_file(op[1])  # a once-good file that broke leaves the results
                    writer.record_failure(op[1], op[2], kind="failed" if op[0] == "fail" else "skipped")
                elif op[0] == "touch":
                    writer.touch_file(op[1].path, op[1].size, op[1].mtime_ns)
                elif op[0] == "withdrawn":  # nothing of it kept, not even a failure row
                    writer.remove_file(op[1])
                    writer.clear_failure(op[1])
                elif op[0] == "rename":
                    writer.rename_file(op[1], op[2].path, op[2].size, op[2].mtime_ns)
            in_order = iter(vectors)  # one vector per frame, in batch order
            writer.add_files([NewFile(d.source.path, d.source.size, d.source.mtime_ns,
                                      d.content_hash, d.source.kind,
                                      [NewImage(f.index, f.width, f.height, next(in_order), d.metadata)
                                       for f in d.frames]) for d in batch])
        report.indexed += len(batch)
        self.touched_series.update(d.metadata.get("series_uid") for d in batch)
        report.images += sum(len(d.frames) for d in batch)

    def _embed(self, tensors: list[np.ndarray]) -> np.ndarray:
        if not tensors:
            return np.zeros((0, self.store.dim), np.float32)
        out = []
        for start in range(0, len(tensors), self.batch_size):
            chunk = stack_planes(tensors[start:start + self.batch_size], self.encoder.device)
            out.append(self.encoder.embed_batch(chunk))
        return np.concatenate(out)


def query_image_vector(encoder: VisionEncoder, file: str | Path,
                       decode: dict | None = None) -> np.ndarray:
    """Embed a query file decoded as the store's images were (``decode``: its manifest's
    recorded settings, None for the defaults)."""
    from .view import DecodeSettings, read_image

    image = read_image(file, image_size=encoder.image_size,
                       settings=DecodeSettings.from_manifest(decode).for_query())
    return encoder.embed_batch(torch.from_numpy(image.tensor[None]))[0]
