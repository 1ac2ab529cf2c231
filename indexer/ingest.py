"""What every indexing engine shares: the plan of a run (which sources are new or changed, which
are gone), the routing of each decoded source (failure, skip, withdrawn, unchanged, renamed,
new), the one-transaction writes through ``Store.writer()``, and the end of a run (removals,
series vectors, index maintenance).

An engine (the local process pool in :mod:`indexer.pipeline`, the Ray cluster in
:mod:`indexer.ray_engine`) only decides how decoding and embedding are spread; it subclasses
:class:`IndexRun` and implements :meth:`IndexRun._stream`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from retrieval import privacy
from retrieval.store import NewFile, NewImage, Store

from .decode import Decoded, DecodeOptions
from .dicomdir import expand_dicomdirs, is_dicomdir_path
from .pacs import PacsAccess, PacsQuery, is_pacs, list_sources, removal_allowed
from .sources import SourceFile, Walker, WalkProblem, under_any

#: Save the FAISS file at least this often during long runs (the DB is committed per batch).
SAVE_EVERY_S = 300.0
#: Touches, renames and failures are written with the next batch, or alone past this many.
MAX_PENDING_OPS = 256


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


@dataclass
class Plan:
    """What one run has to do: ``todo`` is sent to the decoders; the rest routes their results."""

    todo: list[SourceFile]
    known: dict[str, tuple[int, int, str]]   # path → (size, mtime_ns, content hash) stored
    gone: dict[str, str]                     # stored path no longer found → its content hash
    gone_by_hash: dict[str, str]             # content hash → gone path (rename detection)


class IndexRun:
    """One indexing run into a store; subclasses supply the decode → embed stages."""

    #: Re-choose the index type and save the index file when the run ends (a caller that
    #: runs many short batches does it on its own schedule instead).
    save_at_end = True

    def __init__(self, store: Store, *, image_size: int, batch_size: int = 8,
                 frames: str = "middle", phi_policy: str = "hash", progress: bool | None = None,
                 window: str = "file", series_vectors: bool = False,
                 pacs_query: PacsQuery | None = None, pacs: PacsAccess | None = None,
                 keys: privacy.KeyFiles | None = None) -> None:
        """``keys``: where the patient-key files are (the settings' key folder and shared key
        file); ``pacs_query``/``pacs``: what to take from PACS sources and how to reach them."""
        self.store = store
        self.batch_size = max(1, batch_size)
        self.progress = progress
        # the key file (retrieval.privacy), never a secret inside the store; needed to hash
        # patient keys and to keep withdrawn patients and studies out
        self.withdrawn = privacy.withdrawn_markers(store)
        secret = privacy.store_key(store, create=True, keys=keys,
                                   required=phi_policy == "hash" or bool(self.withdrawn))
        self.options = DecodeOptions(image_size=image_size, frames=frames,
                                     phi_policy=phi_policy, phi_secret=secret or b"",
                                     window=window, pacs=pacs or PacsAccess())
        self.series_vectors, self.pacs_query = series_vectors, pacs_query
        self.touched_series: set[str] = set()
        self._last_save = time.monotonic()

    def close(self) -> None:
        """Release what the engine holds (nothing here)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the run ----------------------------------------------------------------------------
    def run(self, roots: Iterable[str | Path]) -> IndexReport:
        started = time.perf_counter()
        report = IndexReport()
        plan = self.plan(roots, report)
        bar = tqdm(total=len(plan.todo), unit="file", file=sys.stderr, dynamic_ncols=True,
                   disable=(not self.progress) if self.progress is not None else None)
        self._last_save = time.monotonic()
        try:
            self._stream(plan, report, bar, started)
            self._finish(plan, report)
        finally:
            self._stop()
            bar.close()
            if self.save_at_end:
                self.store.maintain_index()
                self.store.save()
        report.seconds = round(time.perf_counter() - started, 3)
        return report

    def _stream(self, plan: Plan, report: IndexReport, bar: tqdm, started: float) -> None:
        """Decode and embed ``plan.todo``, routing each result (:meth:`_route`) and writing
        (:meth:`_write`) in batches; the engine's own part of a run."""
        raise NotImplementedError

    def _stop(self) -> None:
        """Stop what :meth:`_stream` started, also when it failed."""

    def plan(self, roots: Iterable[str | Path], report: IndexReport) -> Plan:
        """Walk the roots (and list PACS instances); only new or changed sources are todo."""
        roots = list(roots)
        pacs_roots = [str(r).rstrip("/") for r in roots if is_pacs(str(r))]
        roots = [str(Path(r).expanduser().absolute()) for r in roots
                 if not is_pacs(str(r))] + pacs_roots
        walker = Walker()
        sources = list(expand_dicomdirs(walker.walk(r for r in roots if r not in pacs_roots)))
        sources += self._list_pacs(pacs_roots, walker, has_files=len(roots) > len(pacs_roots))
        report.warnings = [p.to_json() for p in walker.problems]
        report.prune_skipped = [{"root": r, "reason": why} for r, why in walker.unsafe.items()]
        report.total = len(sources)
        known = self.store.known_files(roots)
        todo = [s for s in sources if known.get(s.path, (None, None))[:2] != (s.size, s.mtime_ns)]
        report.unchanged = report.total - len(todo)
        # a file we could not stat is kept; an unreadable or empty root prunes nothing
        seen = {s.path for s in sources} | set(walker.unreadable_files)
        gone = {path: digest for path, (_, _, digest) in known.items()
                if path not in seen and not under_any(path, walker.unsafe)
                and removal_allowed(path, self.pacs_query)}
        gone_by_hash = {digest: path for path, digest in gone.items()}
        # files a DICOMDIR given directly references lie beside it, outside the walked roots
        beside = [str(Path(r).parent) for r in roots if Path(r).is_file() and is_dicomdir_path(r)]
        if beside:
            known.update(self.store.known_files(beside))
        return Plan(todo, known, gone, gone_by_hash)

    def _list_pacs(self, roots: list[str], walker: Walker, has_files: bool) -> list[SourceFile]:
        """The instances each PACS lists. One that cannot be listed is reported (and nothing
        of it removed) while the others are indexed; when none of the sources could be
        listed, the run has nothing to do and says why (``ConnectionError``)."""
        sources: list[SourceFile] = []
        failed: list[str] = []
        for root in roots:
            try:
                listed, problems = list_sources(root, self.pacs_query, self.options.pacs)
                sources += listed
                for problem in problems:  # listed in part: nothing of it may be removed
                    walker.unsafe[root] = "the PACS could be listed only in part"
                    walker.problems.append(WalkProblem(root, root, f"cannot list: {problem}"))
            except ConnectionError as exc:
                failed.append(str(exc))
                walker.unsafe[root] = f"the PACS could not be listed: {exc}"
                walker.problems.append(WalkProblem(root, root, f"cannot list: {exc}"))
        if failed and len(failed) == len(roots) and not has_files:
            raise ConnectionError("; ".join(failed))
        return sources

    def _route(self, decoded: Decoded, plan: Plan, batch: list, ops: list,
               report: IndexReport) -> None:
        """Where one decoded source goes: a pending op, or ``batch`` (to be embedded/written)."""
        path = decoded.source.path
        known = plan.known
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
        elif path not in known and decoded.content_hash in plan.gone_by_hash:
            old = plan.gone_by_hash.pop(decoded.content_hash)
            plan.gone.pop(old, None)
            ops.append(("rename", old, decoded.source))
            report.renamed += 1
        else:
            batch.append(decoded)

    @staticmethod
    def _due(batch: list[Decoded], ops: list[tuple], batch_size: int) -> bool:
        """Whether the gathered files and ops make a batch to write now."""
        return sum(len(d.frames) for d in batch) >= batch_size or len(ops) >= MAX_PENDING_OPS

    def _write(self, vectors: np.ndarray, batch: list[Decoded], ops: list[tuple],
               report: IndexReport) -> None:
        """Write embedded files (``vectors``: one per frame, in batch order) and the pending
        ops in one transaction."""
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

    def _after_write(self, report: IndexReport, bar: tqdm, started: float) -> None:
        """Progress, and the FAISS file saved now and then on long runs."""
        elapsed = time.perf_counter() - started
        bar.set_postfix_str(f"{report.images / elapsed:.2f} img/s")
        if time.monotonic() - self._last_save > SAVE_EVERY_S:
            self.store.maintain_index()
            self.store.save()
            self._last_save = time.monotonic()

    def _finish(self, plan: Plan, report: IndexReport) -> None:
        """Remove what is gone; update series vectors."""
        if plan.gone:
            with self.store.writer() as writer:
                for path in plan.gone:
                    writer.remove_file(path)
                    writer.clear_failure(path)
            report.removed = len(plan.gone)
        if self.series_vectors:
            from .series import stale_series, update_series_vectors

            report.series = update_series_vectors(
                self.store, self.touched_series | set(stale_series(self.store)))
