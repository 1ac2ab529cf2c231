"""The store: a folder holding the FAISS index and manifest, and the rows (SQLite in the folder
or a PostgreSQL database), kept in step.

:class:`Store` is the facade every other module reads and writes through. Its parts:
``layout`` (folder, manifest, lock, atomic files), ``rows`` (SQL through SQLAlchemy, the only
place that opens database sessions), ``writer`` (one write transaction), ``vectors`` (the
FAISS index's life) and ``integrity`` (check, repair, backup).

The database is the source of truth: rows and raw vectors are written in one transaction. The
index is a derived cache written atomically and reconciled with the rows by id at every open,
so a process killed at any moment leaves a store that opens with index and rows agreeing; an
open skips comparing ids when the file was saved from rows that still carry its vectors token
(random, replaced by triggers at every change of the vectors table). Ids are never handed out
twice, even when the last commit was lost (see :meth:`Store._guard_ids`). Saving only
persists: retraining or re-choosing the index type is :meth:`maintain_index`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from sqlalchemy.orm import Session

from ..errors import StoreError
from . import integrity
from .integrity import backup
from .database import CommitCounter, WriterLock
from .layout import (DATABASE, DEFAULT_INDEX_TYPE, DIR_MODE, FILE_MODE, FORMAT_VERSION, INDEX_FILE,
                     LOCK_FILE, MANIFEST, Manifest, create_private_file, file_checksums,
                     fsync_dir, is_temp_name, make_folder, manifest_for, remove_stale_temps)
from .location import adopt, database_url, lock_store, prepare_new, read_manifest, record_manifest
from .rows import IMAGE_COLUMNS, Rows, image_dict
from .schema import SCHEMA_VERSION
from .indexfile import read_index_file
from .vectors import TOMBSTONE_FRACTION, TOMBSTONE_MIN, VectorIndex, new_index, resolve_index_type
from .writer import NewFile, NewImage, StoreWriter

if TYPE_CHECKING:
    from ..filters import Filters

__all__ = ["Store", "StoreWriter", "NewImage", "NewFile", "Manifest", "manifest_for", "backup",
           "new_index", "read_index_file", "file_checksums", "fsync_dir",
           "image_dict", "is_temp_name", "DATABASE", "INDEX_FILE", "LOCK_FILE", "MANIFEST",
           "FORMAT_VERSION", "SCHEMA_VERSION", "DEFAULT_INDEX_TYPE", "DIR_MODE", "FILE_MODE",
           "IMAGE_COLUMNS", "TOMBSTONE_MIN", "TOMBSTONE_FRACTION"]


class Store:
    """Open with :meth:`open` or :meth:`create`; search and write through one object."""

    def __init__(self, root: Path, manifest: Manifest, *, readonly: bool = False,
                 full_check: bool = False, lock: WriterLock | None = None,
                 db: str | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.readonly = readonly
        #: The PostgreSQL URL the rows live in; None: SQLite in the folder.
        self.url = db
        if db is None and not readonly and not (root / DATABASE).exists():
            create_private_file(root / DATABASE)
        #: The rows (engine and sessions live there and nowhere else).
        self.db = Rows(db or root / DATABASE, manifest.dim, readonly=readonly)
        self._lock: WriterLock | None = lock  # the writer lock, when this store holds it
        self.vector_index = VectorIndex(root, manifest, readonly=readonly,
                                        all_vectors=self.db.all_vectors)
        self.vector_index.load(full_check)
        self._high_water = max(manifest.id_high_water, self.vector_index.max_id(),
                               self.db.db_max_id())
        if not self.vector_index.trust_saved(self.db.vectors_token()):
            self.reconcile()
        if self.index_problem:
            self.vector_index.dirty = True
            if not readonly:
                self._save_if_unlocked()
        elif self._lock is not None and self.vector_index.token_unrecorded:
            self.vector_index.dirty = True  # saved by this writer: later opens skip the ids

    #: The SQLAlchemy engine and sessions (for tests and Alembic; code goes through :attr:`db`).
    engine = property(lambda self: self.db.engine)
    sessions = property(lambda self: self.db.sessions)
    index = property(lambda self: self.vector_index.index)  # the faiss.Index in memory

    @property
    def index_problem(self) -> str | None:
        """Why the index file on disk could not be used (None: it was fine or absent)."""
        return self.vector_index.problem

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, manifest: Manifest, *, exclusive: bool = False,
               db: str | None = None) -> "Store":
        """A new store in an empty (or new) folder, made under the writer lock so two runs
        never both create it; ``exclusive``: keep the lock until :meth:`close`; ``db``: a
        PostgreSQL URL for the rows (None: SQLite in the folder)."""
        root = Path(root)
        make_folder(root)
        lock = lock_store(root, None)
        try:
            store = cls._create_locked(root, manifest, lock, db)
        except BaseException:
            lock.release()
            raise
        if not exclusive:
            store._lock = None
            lock.release()
        return store

    @classmethod
    def _create_locked(cls, root: Path, manifest: Manifest, lock: WriterLock,
                       db: str | None) -> "Store":
        prepare_new(root, manifest, lock, db)
        resolve_index_type(manifest)  # validated before anything is written
        store = cls(root, manifest, lock=lock, db=db)
        if db is not None:
            record_manifest(store.db, manifest)  # other folders adopt the store from it
        manifest.write(root / MANIFEST)  # last: a reader sees a store only once it is whole
        return store

    @classmethod
    def open(cls, root: str | Path, *, readonly: bool = False, exclusive: bool = False,
             full_check: bool = False, db: str | None = None,
             _lock: WriterLock | None = None) -> "Store":
        """Open a store; ``exclusive``: take the writer lock first and hold it until
        :meth:`close`; ``full_check``: also verify the index file's sha256; ``db``: the
        PostgreSQL URL (None: the manifest's; a new folder adopts the database's store)."""
        root = Path(root)
        if not (root / MANIFEST).is_file() and not (db and adopt(root, db)):
            raise StoreError(f"no store at {root} (no {MANIFEST}); create one by indexing "
                             "into it (`medsearch index`)", setting="store")
        lock = lock_store(root, None) if exclusive else _lock
        try:
            manifest = read_manifest(root)
            url = database_url(root, manifest, db)
            if lock is not None:
                lock.ensure_advisory(url)
                remove_stale_temps(root)
            store = cls(root, manifest, readonly=readonly, full_check=full_check, lock=lock,
                        db=url)
        except BaseException:
            if exclusive:
                lock.release()
            raise
        return store

    @classmethod
    def open_or_create(cls, root: str | Path, manifest: Manifest, *,
                       exclusive: bool = False, db: str | None = None) -> "Store":
        """Open the store at ``root`` (refusing another model's) or create it.

        ``exclusive=True`` (what an index run wants) takes the writer lock before looking, so
        the check "is there a store?" and the creation are one step no other run can split;
        the lock is held until :meth:`close`."""
        root = Path(root)
        if db is not None and not (root / MANIFEST).is_file():
            adopt(root, db)  # a new folder over a database that already holds the store
        if exclusive:
            make_folder(root)
            lock = lock_store(root, None)
            try:
                if (root / MANIFEST).is_file():
                    store = cls.open(root, db=db, _lock=lock)
                    store.check_compatible(manifest)
                else:
                    store = cls._create_locked(root, manifest, lock, db)
            except BaseException:
                lock.release()
                raise
            return store
        if (root / MANIFEST).is_file():
            store = cls.open(root, db=db)
            store.check_compatible(manifest)
            return store
        return cls.create(root, manifest, db=db)

    def check_compatible(self, other: Manifest) -> None:
        """Refuse vectors from another model, weights, dimension or preprocessing."""
        self.manifest.check_compatible(other, self.root)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def count(self) -> int:
        """Live vectors in the index (hidden deleted ones not counted)."""
        return self.vector_index.count

    holds_lock = property(lambda self: self._lock is not None)

    # -- the index -----------------------------------------------------------------------------
    def verify_index_file(self) -> str | None:
        """Check the index file on disk in full (size, crc32, sha256, id count); on a problem
        the store stops using what it loaded and rebuilds from the vectors (in memory when
        read-only). Returns the problem, or None. Run at `medsearch check` and server start."""
        had_problem = self.index_problem is not None
        problem = self.vector_index.verify_file()
        if problem and not had_problem:
            self.reconcile()
            if not self.readonly:
                self._save_if_unlocked()
        return problem

    def reconcile(self) -> None:
        """Make the in-memory index hold exactly the ids that have vectors in the database.

        The ids, the vectors to add and the vectors token are read in one read transaction: a
        reader sees the rows of a whole committed batch or none of it, never a write half-way.
        The index then matches the rows of that token (:attr:`VectorIndex.synced`)."""
        vi = self.vector_index
        extra, missing, vectors, token = self.db.diff(vi.ids(), read_missing=vi.index.is_trained)
        vi.follow(extra, missing, vectors, token)

    def rebuild(self, index_type: str, shards: int | None = None) -> None:
        """Build a fresh index of ``index_type`` ("auto": chosen for the count) from the stored
        raw vectors, in ``shards`` shards by id (None: the layout now); a type that needs more
        vectors to train is searched exactly until it has them (see :meth:`index_status`)."""
        self.vector_index.rebuild(index_type, shards)

    def index_status(self) -> dict:
        """The index actually in memory: the manifest's type, or exact search while that type
        waits for enough vectors to be trained."""
        return self.vector_index.status()

    def maintenance_due(self) -> str | None:
        """What :meth:`maintain_index` would do now: "rebuild", "retrain" or None."""
        return self.vector_index.maintenance_due()

    def maintain_index(self) -> dict:
        """Re-choose an automatic index type for the count and (re)train a type that has
        enough vectors; returns {"action": "rebuilt"|"retrained"|"nothing", index status…}.
        An index run calls it at each checkpoint and at its end, `reindex` after rebuilding."""
        if self.readonly:
            raise StoreError(f"store {self.root} was opened read-only")
        return self.vector_index.maintain()

    def save(self) -> None:
        """Write the index atomically if it changed; a kill mid-save keeps the old file.
        Only persists: the index is never retrained or re-chosen here. The file records the
        rows' vectors token when its ids are known, or now checked, to be those rows'."""
        vi = self.vector_index
        if self.readonly or not vi.dirty:
            return
        if vi.synced is None or vi.synced != self.db.vectors_token():
            extra, missing, _, token = self.db.diff(vi.ids(), read_missing=False)
            vi.hide(extra, None if missing.size else token)  # missing: another writer's rows
        self._high_water = vi.write(self._high_water)

    def _save_if_unlocked(self) -> None:
        """Save a repaired index now unless another process holds the writer lock (that
        process saves its own, whole index when it finishes)."""
        if self._lock is not None:
            self.save()
            return
        try:
            lock = lock_store(self.root, self.url)
        except StoreError:
            return
        try:
            self.save()
        finally:
            lock.release()

    def _guard_ids(self, session: Session) -> None:
        """Start new ids above every id ever handed out (see :meth:`Rows.guard_ids`): the
        high-water mark is the max of the manifest's, the loaded index's and SQLite's."""
        self.db.guard_ids(session, self._high_water)

    # -- writing -------------------------------------------------------------------------------
    @contextmanager
    def writer(self) -> Iterator[StoreWriter]:
        """A transaction; on success the FAISS index follows the committed rows."""
        if self.readonly:
            raise StoreError(f"store {self.root} was opened read-only")
        with self.db.transaction() as session:
            writer = StoreWriter(self, session)
            yield writer
        if writer.added:
            self._high_water = max(self._high_water, max(i for i, _ in writer.added))
        if writer.added or writer.removed:  # the rows' token is not known now: see save()
            ids = np.fromiter((i for i, _ in writer.added), np.int64, count=len(writer.added))
            self.vector_index.follow(np.asarray(writer.removed, np.int64), ids,
                                     np.stack([v for _, v in writer.added])
                                     if writer.added else None, None)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Only one writing process at a time (readers never wait); a no-op when this store
        already holds the lock (opened with ``exclusive=True``)."""
        if self._lock is not None:
            yield
            return
        lock = lock_store(self.root, self.url)
        self._lock = lock
        try:
            yield
        finally:
            if self._lock is lock:  # not already released by close() inside the block
                self._lock = None
                lock.release()

    def set_setting(self, key: str, value: str) -> None:
        self.db.set_setting(key, value)

    def delete_setting_securely(self, key: str) -> None:
        """Delete a setting and zero the pages it used (secure_delete, WAL emptied)."""
        self.db.delete_setting_securely(key)

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (old page images hold deleted rows)."""
        self.db.checkpoint()

    # -- integrity (retrieval/store/integrity.py) ----------------------------------------------
    def check(self) -> dict:
        """Rows against vectors against the index file on disk."""
        return integrity.check(self)

    def repair(self, *, drop: bool = False) -> dict:
        """Rebuild what is derived; ``drop``: remove sources that must be re-embedded."""
        return integrity.repair(self, drop=drop)

    # -- reading -------------------------------------------------------------------------------
    def setting(self, key: str, default: str | None = None) -> str | None:
        return self.db.setting(key, default)

    def setting_keys(self, prefix: str) -> set[str]:
        return self.db.setting_keys(prefix)

    def vectors(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Raw vectors for ``ids``, in that order (missing ids raise)."""
        return self.db.vectors(ids)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self.db.all_vectors()[:2]

    def vectors_for_paths(self, paths: list[str]) -> dict[str, np.ndarray]:
        """path → the stored vector of its middle frame, for the paths that are indexed."""
        return self.db.vectors_for_paths(paths)

    def ids_for_path(self, path: str) -> set[int]:
        """Ids of the images stored for one source path."""
        return self.db.ids_for_path(path)

    def vector_ids(self) -> np.ndarray:
        """Ids of every stored vector, ascending."""
        return self.db.vector_ids()

    def series_images(self, series_uids: list[str], *, exclude_kind: str) -> list[dict]:
        """Image rows (as dicts) of these DICOM series, sources of ``exclude_kind`` left out."""
        return self.db.series_images(series_uids, exclude_kind=exclude_kind)

    def series_counts(self, kind: str) -> tuple[dict[str, int], dict[str, int]]:
        """(series uid → members its ``kind`` row was made from, → images stored now)."""
        return self.db.series_counts(kind)

    def sources_of(self, *, patient_keys: list[str] | None = None,
                   study_uid: str | None = None) -> tuple[list[tuple[str, str]], int]:
        """((path, kind) of the sources of these patients or this study, their label count)."""
        return self.db.sources_of(patient_keys=patient_keys, study_uid=study_uid)

    def known_files(self, roots: list[str]) -> dict[str, tuple[int, int, str]]:
        """path → (size, mtime_ns, content_hash) of stored sources under any of ``roots``."""
        return self.db.known_files(roots)

    def image_keys(self) -> list[tuple[int, str, int, str]]:
        """(id, path, frame, content hash) of every stored image."""
        return self.db.image_keys()

    def failures(self) -> dict[str, str]:
        """path → reason of every source recorded as failed or skipped."""
        return self.db.failures()

    def labels(self, source: str) -> list[tuple[str, int, str, float | None]]:
        """(path, frame, label, score) of every label written by ``source``."""
        return self.db.labels(source)

    def matching_ids(self, filters: "Filters") -> np.ndarray:
        """Sorted ids of the rows the filters admit."""
        return self.db.matching_ids(filters)

    def search(self, queries: np.ndarray, k: int,
               filters: "Filters | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; ids are -1 where fewer than k exist."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise StoreError(f"query vectors are {queries.shape[1]}-d, the store holds {self.dim}-d")
        k = max(1, int(k))
        allowed = None if filters is None or filters.empty else self.matching_ids(filters)
        return self.vector_index.search(queries, k, allowed, self.vectors)

    def rows(self, ids: list[int]) -> dict[int, dict]:
        """Metadata of images by id, as plain dicts (path and frame included)."""
        return self.db.rows(ids)

    def stats(self) -> dict:
        return self.db.stats()

    def commit_counter(self) -> CommitCounter:
        """A counter that moves when another process commits to this store (see reconcile)."""
        return CommitCounter(self.url or self.root / DATABASE, self.db.engine)

    def close(self) -> None:
        """Save (if changed), release the engine, then the writer lock if held."""
        try:
            self.save()
        finally:
            self.db.dispose()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
