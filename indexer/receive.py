"""`medsearch receive`: a C-STORE SCP (pynetdicom) that indexes what modalities or a PACS push.

Two halves meet at the spool (:mod:`indexer.spool`). The network half, in pynetdicom's
association threads, accepts associations only from the allow-listed calling AE titles, writes
each instance durably to the spool and only then answers Success; a full disk is answered with
Out of Resources, so the sender keeps the instance and retries. The indexing half, in the main
thread, takes the spooled instances in short batches, and for each batch takes the store's
writer lock, catches up with what other writers committed, decodes (in a supervised worker:
a file that crashes a decoder costs that file) and embeds with the same rules as `index`
(decode settings, PHI policy, withdrawn patients, incremental by content), commits, releases
the lock and only then removes the batch's spool files. While an `index` run holds the lock
the instances wait in the spool. Series vectors are computed for a series once nothing new has
arrived for it during the quiet period.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from retrieval.errors import StoreBusyError, StoreError
from retrieval.store import Store
from retrieval.store.layout import atomic_write_bytes

from .ingest import IndexReport, Plan
from .pipeline import Indexer
from .spool import Spool, spooled_source

#: DIMSE C-STORE statuses
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
#: The in-memory index is written to the index file at least this often (rows are committed
#: per batch; a kill before a save is repaired from the rows at the next open).
SAVE_EVERY_S = 120.0
#: At most this many instances per batch (one short hold of the writer lock).
MAX_BATCH = 64
SERIES_FILE = "series-pending.json"
T = TypeVar("T")


@dataclass(frozen=True)
class ReceiveConfig:
    """What the receiver listens on and whom it accepts."""

    aet: str = "MEDSEARCH"
    host: str = "127.0.0.1"
    port: int = 11112
    allow: tuple[str, ...] = ()          # calling AE titles accepted; ("*",): any
    batch_seconds: float = 2.0           # the longest an instance waits before its batch
    quiet_seconds: float = 60.0          # a series is complete after this long without news
    series_vectors: bool = False
    tls: ssl.SSLContext | None = None    # DICOM TLS (the server's certificate and key)
    min_free_bytes: int = 256 << 20      # below this free space, refuse (Out of Resources)


class SpoolRun(Indexer):
    """One batch of spooled instances: the sources are given, nothing is ever pruned."""

    save_at_end = False  # the receiver saves the index file on its own schedule

    def plan(self, roots, report: IndexReport) -> Plan:
        sources = list(roots)
        report.total = len(sources)
        known = self.store.known_files([s.path for s in sources])  # a batch: at most MAX_BATCH
        return Plan(sources, known, {}, {})

    def _route(self, decoded, plan, batch, ops, report) -> None:
        super()._route(decoded, plan, batch, ops, report)
        if not decoded.error and not decoded.skipped:  # unchanged too: a resumed batch
            self.touched_series.add(decoded.metadata.get("series_uid"))


class Receiver:
    """The SCP and the batches that index what it spools."""

    def __init__(self, store: Store, encoder, config: ReceiveConfig, *, pool,
                 run_options: dict, log: Callable[[str], None] = lambda line: None) -> None:
        self.store, self.encoder, self.config, self.pool = store, encoder, config, pool
        self.run_options, self.log = run_options, log
        self.spool = Spool(store.root / "spool", min_free_bytes=config.min_free_bytes)
        self.wake = threading.Event()
        self.server = None
        self.received = self.refused = 0
        self.totals = IndexReport()
        self._last_save = time.monotonic()
        self._busy_logged = False
        self.series = self._load_series()

    # -- the network half ------------------------------------------------------------------------
    def start(self) -> None:
        """Listen (returns at once; associations are served on pynetdicom's threads)."""
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.aet)
        ae.require_called_aet = True
        if "*" not in self.config.allow:
            ae.require_calling_aet = list(self.config.allow)
        ae.maximum_associations = 16
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        syntaxes = accepted_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(
            (self.config.host, self.config.port), block=False, ssl_context=self.config.tls,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event) -> int:
        """Acknowledge only what is durably in the spool."""
        if not self.spool.has_room():
            self.refused += 1
            return OUT_OF_RESOURCES
        try:
            data = event.encoded_dataset()
        except Exception:  # a dataset pynetdicom could not frame: the sender is told
            self.refused += 1
            return CANNOT_UNDERSTAND
        try:
            self.spool.put(data)
        except StoreError:  # the disk is full or failing: the sender keeps it and retries
            self.refused += 1
            return OUT_OF_RESOURCES
        self.received += 1
        self.wake.set()
        return SUCCESS

    def stop_listening(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # -- the indexing half ----------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        """Index batches until ``stop`` is set; then index what is spooled and save."""
        while not stop.is_set():
            self.wake.wait(self.config.batch_seconds)
            self.wake.clear()
            time.sleep(0.2 if not stop.is_set() else 0)  # let a burst gather into one batch
            self.index_pending()
            self.finish_quiet_series()
        self.stop_listening()
        while self.index_pending(wait=True):
            pass
        self.finish_quiet_series(force=True)
        self.checkpoint(force=True)

    def index_pending(self, wait: bool = False) -> bool:
        """Index one batch from the spool; False when there was nothing (or the store was
        busy: the batch waits in the spool)."""
        files = self.spool.pending(MAX_BATCH)
        if not files:
            return False
        latest = {}
        for path in files:  # oldest first: a later version of an instance wins
            try:
                source = spooled_source(path)
            except FileNotFoundError:
                continue
            latest[source.path] = source

        def batch() -> IndexReport:
            self.store.reconcile()  # what other writers committed meanwhile
            with SpoolRun(self.store, self.encoder, pool=self.pool, progress=False,
                          **self.run_options) as run:
                report = run.run(list(latest.values()))
            self._note_series(run.touched_series)
            self.checkpoint()
            return report

        report = self._under_lock(batch, wait, f"{len(files)}+ instance(s) wait in the spool")
        if report is None:
            return False
        self.spool.remove(files)  # committed: the spool copies may go
        self._add(report)
        self.log(f"indexed {report.indexed} instance(s) ({report.images} image(s)), unchanged "
                 f"{report.unchanged}, failed {report.failed}, skipped {len(report.skipped)}"
                 + "".join(f"\n  failed: {f['path']}: {f['reason']}" for f in report.failures))
        return True

    def _under_lock(self, work: Callable[[], T], wait: bool, waiting: str) -> T | None:
        """``work()`` under the store's writer lock; None if another process holds it (with
        ``wait``: retried for up to a minute, as at shutdown)."""
        deadline = time.monotonic() + (60.0 if wait else 0.0)
        while True:
            try:
                with self.store.exclusive():
                    result = work()
                self._busy_logged = False
                return result
            except StoreBusyError as exc:
                if time.monotonic() >= deadline:
                    if not self._busy_logged:
                        self.log(f"the store is busy ({exc}); {waiting}")
                        self._busy_logged = True
                    return None
                time.sleep(0.1)

    def _add(self, report: IndexReport) -> None:
        for name in ("indexed", "unchanged", "failed", "images"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(report, name))
        self.totals.failures += report.failures
        self.totals.skipped += report.skipped

    def checkpoint(self, force: bool = False) -> None:
        """Re-choose/train the index type as it grows and save the index file, now and then
        (``force``: now, taking the lock)."""
        if not force and time.monotonic() - self._last_save < SAVE_EVERY_S:
            return
        def save() -> bool:
            self.store.maintain_index()
            self.store.save()
            return True

        if self._under_lock(save, force, "the index file is saved later"):
            self._last_save = time.monotonic()

    # -- series vectors --------------------------------------------------------------------------
    def _load_series(self) -> dict[str, float]:
        """Series waiting for their quiet period, kept beside the spool across restarts."""
        try:
            saved = json.loads((self.spool.folder / SERIES_FILE).read_text())
            return {str(k): float(v) for k, v in saved.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _note_series(self, series: set) -> None:
        if not self.config.series_vectors:
            return
        now = time.time()
        self.series.update({uid: now for uid in series if uid})
        self._save_series()

    def _save_series(self) -> None:
        atomic_write_bytes(self.spool.folder / SERIES_FILE, json.dumps(self.series).encode())

    def finish_quiet_series(self, force: bool = False) -> int:
        """Series vectors for the series quiet for ``quiet_seconds`` (``force``: all)."""
        from .series import update_series_vectors

        now = time.time()
        due = [uid for uid, seen in self.series.items()
               if force or now - seen >= self.config.quiet_seconds]
        if not due:
            return 0
        written = self._under_lock(lambda: update_series_vectors(self.store, due), force,
                                   f"{len(due)} series vector(s) wait")
        if written is None:
            return 0
        for uid in due:
            self.series.pop(uid, None)
        self._save_series()
        self.log(f"series vectors: {written} written for {len(due)} quiet series")
        return written


def accepted_syntaxes() -> list[str]:
    """Every transfer syntax, encapsulated ones first: the acceptor's order decides, and a
    sender offering its file's own compressed syntax beside uncompressed ones should send it
    as stored (it may have no decoder; nothing is transcoded)."""
    from pydicom.uid import AllTransferSyntaxes, UID

    known = [UID(uid) for uid in AllTransferSyntaxes]
    return [*[u for u in known if u.is_encapsulated], *[u for u in known if not u.is_encapsulated]]


def server_tls(cert: str | Path, key: str | Path, ca: str | Path | None) -> ssl.SSLContext:
    """TLS for the receiver: our certificate; with ``ca``, senders must present one it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    context.load_cert_chain(str(cert), str(key))
    context.verify_mode = ssl.CERT_REQUIRED if ca else ssl.CERT_NONE
    return context
