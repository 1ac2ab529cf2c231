"""A store directory: FAISS index + SQLite metadata + raw vectors + manifest, kept in step.

SQLite is the source of truth: rows and their raw vectors are written in one transaction.
The FAISS file is a derived cache written atomically (temp file + rename); on open it is
reconciled with the database by id, so a process killed at any moment leaves a store that
opens with index and rows agreeing.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
from sqlalchemy import RowMapping, create_engine, delete, event, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from . import index_choice
from .errors import StoreError
from .filters import Filters
from .schema import (DICOM_FIELDS, SCHEMA_VERSION, FailureRow, FileRow, ImageRow, LabelRow,
                     SettingRow, VectorRow)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "meta.sqlite"
INDEX_FILE = "index.faiss"
LOCK_FILE = "write.lock"
TOMBSTONE_MIN = 256
TOMBSTONE_FRACTION = 0.02
#: Metadata keys an image row stores (anything else a decoder reports is not kept).
IMAGE_COLUMNS = frozenset(DICOM_FIELDS) | {"patient_key"}
DEFAULT_INDEX_TYPE = "Flat"


@dataclass
class Manifest:
    """What every vector in the store was made with; a mismatch is refused, never mixed."""

    model: str
    model_revision: str
    model_fingerprint: str
    dim: int
    preprocessing_version: str
    index_type: str = DEFAULT_INDEX_TYPE
    index_auto: bool = False        # re-chosen from the vector count (retrieval.index_choice)
    index_reason: str = ""          # why this index type (shown by `medsearch info`)
    index_trained_on: int | None = None  # vectors the IVF/PQ/SQ index was trained on (None: unknown)
    format_version: int = FORMAT_VERSION
    schema_version: int = SCHEMA_VERSION
    created_at: float = field(default_factory=time.time)

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"{path} is not a readable store manifest ({exc}); "
                             "point --store at a folder made by `medsearch index`") from None

    def write(self, path: Path) -> None:
        _atomic_write_bytes(path, json.dumps(asdict(self), indent=2).encode())


def manifest_for(encoder, index_type: str) -> Manifest:
    """The manifest for vectors made by a VisionEncoder (local folders by absolute path)."""
    from .preprocess import PREPROCESSING_VERSION

    ckpt = encoder.checkpoint
    name = str(ckpt.path) if ckpt.revision == "local" else ckpt.name
    return Manifest(model=name, model_revision=ckpt.revision, model_fingerprint=ckpt.fingerprint,
                    dim=encoder.dim, preprocessing_version=PREPROCESSING_VERSION,
                    index_type=index_type)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_index(index_type: str, dim: int) -> faiss.Index:
    """An empty index of a FAISS factory type, addressed by our row ids (IDMap2 wrapper)."""
    if index_type == index_choice.AUTO:
        index_type = index_choice.choose_index(0, dim).index_type
    try:
        base = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise StoreError(f"invalid FAISS index type {index_type!r}: "
                         f"{str(exc).splitlines()[-1]}") from None
    return faiss.IndexIDMap2(index_choice.configure(base))


def _index_ids(index: faiss.Index) -> np.ndarray:
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def _supports_removal(index: faiss.Index) -> bool:
    """Only flat storage compacts on removal, as IndexIDMap2's id map assumes; removing from an
    IVF inside it leaves the map pointing at the wrong rows, so IVF hides removals like HNSW."""
    base = faiss.downcast_index(faiss.downcast_index(index).index)
    return isinstance(base, faiss.IndexFlat)


def vectors_from_blobs(blobs: list[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)


@dataclass
class NewImage:
    """An embedded image or frame waiting to be written, with its metadata."""

    frame: int
    width: int
    height: int
    vector: np.ndarray
    metadata: dict = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)


@dataclass
class NewFile:
    """A source with all its embedded images, written as one unit."""

    path: str
    size: int
    mtime_ns: int
    content_hash: str
    source_kind: str
    images: list[NewImage]


def _chunks(values: list, size: int = 900):
    """SQLite caps bound parameters per statement; IN lists go in chunks."""
    for start in range(0, len(values), size):
        yield values[start:start + size]


class StoreWriter:
    """One transaction's worth of changes; the FAISS index follows only after commit.

    Files are written with a few set-based statements per batch rather than ORM objects: the
    ORM's per-object flushes cost ~4 ms a file, which capped a GPU indexing run near 200
    files/s in the main process.
    """

    def __init__(self, store: "Store", session: Session) -> None:
        self.store, self.session = store, session
        self.added: list[tuple[int, np.ndarray]] = []
        self.removed: list[int] = []

    def remove_files(self, paths: list[str]) -> int:
        """Delete sources and their images (vectors and labels cascade); returns images removed."""
        self.session.flush()  # pending ORM changes (touch/rename) first
        file_ids: list[int] = []
        for chunk in _chunks(list(paths)):
            file_ids += self.session.scalars(select(FileRow.id).where(FileRow.path.in_(chunk))).all()
        if not file_ids:
            return 0
        image_ids: list[int] = []
        for chunk in _chunks(file_ids):
            image_ids += self.session.scalars(
                select(ImageRow.id).where(ImageRow.file_id.in_(chunk))).all()
            # ON DELETE CASCADE (foreign_keys=ON) removes images, vectors and labels
            self.session.execute(delete(FileRow).where(FileRow.id.in_(chunk))
                                 .execution_options(synchronize_session=False))
        self.session.expire_all()  # no stale ORM objects for the deleted rows
        self.removed.extend(image_ids)
        return len(image_ids)

    def remove_file(self, path: str) -> int:
        """Delete a source and its images; returns the number of images removed."""
        return self.remove_files([path])

    def add_files(self, files: list[NewFile]) -> list[list[int]]:
        """Insert (or replace) sources with all their images and vectors; image ids per file."""
        if not files:
            return []
        if len({f.path for f in files}) < len(files):  # the same source twice: later ones win
            return [self.add_files([f])[0] for f in files]
        dim = self.store.dim
        vectors = []
        for f in files:
            for image in f.images:
                vector = np.ascontiguousarray(image.vector, dtype=np.float32)
                if vector.shape != (dim,):
                    raise StoreError(f"vector of shape {vector.shape} for {f.path}; this store "
                                     f"holds {dim}-d vectors")
                vectors.append(vector)
        paths = [f.path for f in files]
        self.remove_files(paths)
        file_ids = self.session.scalars(
            insert(FileRow).returning(FileRow.id, sort_by_parameter_order=True),
            [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns,
              "content_hash": f.content_hash, "source_kind": f.source_kind} for f in files]).all()
        image_rows = [{**dict.fromkeys(IMAGE_COLUMNS),
                       **{k: v for k, v in image.metadata.items() if k in IMAGE_COLUMNS},
                       "file_id": file_id, "frame": image.frame, "width": image.width,
                       "height": image.height}
                      for f, file_id in zip(files, file_ids) for image in f.images]
        image_ids = list(self.session.scalars(
            insert(ImageRow).returning(ImageRow.id, sort_by_parameter_order=True),
            image_rows).all()) if image_rows else []
        if image_ids:
            self.session.execute(insert(VectorRow), [
                {"image_id": i, "vector": v.tobytes()} for i, v in zip(image_ids, vectors)])
        labels = [{"image_id": i, "label": label, "source": "user", "score": None}
                  for i, image in zip(image_ids, (im for f in files for im in f.images))
                  for label in image.labels]
        if labels:
            self.session.execute(insert(LabelRow), labels)
        for chunk in _chunks(paths):
            self.session.execute(delete(FailureRow).where(FailureRow.path.in_(chunk))
                                 .execution_options(synchronize_session=False))
        self.added.extend(zip(image_ids, vectors))
        out, at = [], 0
        for f in files:
            out.append(image_ids[at:at + len(f.images)])
            at += len(f.images)
        return out

    def add_file(self, *, path: str, size: int, mtime_ns: int, content_hash: str,
                 source_kind: str, images: list[NewImage]) -> list[int]:
        """Insert (or replace) one source with all its images and vectors."""
        return self.add_files([NewFile(path, size, mtime_ns, content_hash, source_kind, images)])[0]

    def touch_file(self, path: str, size: int, mtime_ns: int) -> None:
        """Same content under a new mtime: remember it so the next run skips the hash."""
        row = self.session.scalar(select(FileRow).where(FileRow.path == path))
        if row is not None:
            row.size, row.mtime_ns = size, mtime_ns

    def rename_file(self, old: str, new: str, size: int, mtime_ns: int) -> None:
        row = self.session.scalar(select(FileRow).where(FileRow.path == old))
        if row is not None:
            row.path, row.size, row.mtime_ns = new, size, mtime_ns

    def record_failure(self, path: str, reason: str, kind: str = "failed") -> None:
        self.session.merge(FailureRow(path=path, reason=reason, kind=kind))

    def clear_failure(self, path: str) -> None:
        self.session.execute(delete(FailureRow).where(FailureRow.path == path))


class Store:
    """Open with :meth:`open` or :meth:`create`; search and write through one object."""

    def __init__(self, root: Path, manifest: Manifest, *, readonly: bool = False) -> None:
        self.root = root
        self.manifest = manifest
        self.readonly = readonly
        self.engine = create_engine(f"sqlite:///{root / DATABASE}", hide_parameters=True)  # no query data in logs
        event.listen(self.engine, "connect", _sqlite_pragmas)
        self._migrate()
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock_fd: int | None = None
        #: Deleted ids still inside an index that cannot remove (HNSW): hidden from results
        #: until enough pile up to be worth a rebuild.
        self._tombstones = np.zeros(0, np.int64)
        self.index = self._load_index()
        self._dirty = False
        self.reconcile()

    def _migrate(self) -> None:
        """Create or upgrade the schema with Alembic; a read-only open never writes it."""
        from . import migrations

        if self.readonly and migrations.current(self.engine) == migrations.head():
            return
        if self.readonly and (self.root / DATABASE).stat().st_size > 0:
            raise StoreError(f"store {self.root} needs a schema upgrade; run any writing "
                             "command on it first (e.g. `medsearch index` or `medsearch reindex`)")
        migrations.upgrade(self.engine)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, manifest: Manifest) -> "Store":
        root = Path(root)
        if (root / MANIFEST).exists():
            raise StoreError(f"{root} already holds a store; open it instead")
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{root} exists and is not empty; choose a new folder for the store")
        root.mkdir(parents=True, exist_ok=True)
        if manifest.index_type == index_choice.AUTO:
            choice = index_choice.choose_index(0, manifest.dim)
            manifest.index_type, manifest.index_auto = choice.index_type, True
            manifest.index_reason = f"auto: {choice.reason}"
        new_index(manifest.index_type, manifest.dim)  # validate before writing anything
        manifest.write(root / MANIFEST)
        return cls(root, manifest)

    @classmethod
    def open(cls, root: str | Path, *, readonly: bool = False) -> "Store":
        root = Path(root)
        if not (root / MANIFEST).is_file():
            raise StoreError(f"no store at {root} (no {MANIFEST}); create one with "
                             f"`medsearch index PATH --store {root}`")
        manifest = Manifest.read(root / MANIFEST)
        if manifest.format_version > FORMAT_VERSION or manifest.schema_version > SCHEMA_VERSION:
            raise StoreError(f"store {root} was written by a newer medsearch (format "
                             f"{manifest.format_version}, schema {manifest.schema_version}); "
                             "upgrade medsearch to open it")
        return cls(root, manifest, readonly=readonly)

    @classmethod
    def open_or_create(cls, root: str | Path, manifest: Manifest) -> "Store":
        root = Path(root)
        if (root / MANIFEST).is_file():
            store = cls.open(root)
            store.check_compatible(manifest)
            return store
        return cls.create(root, manifest)

    def check_compatible(self, other: Manifest) -> None:
        """Refuse vectors from another model, weights, dimension or preprocessing."""
        mine = self.manifest
        for name in ("model_fingerprint", "dim", "preprocessing_version"):
            if getattr(mine, name) != getattr(other, name):
                raise StoreError(
                    f"store {self.root} was built with model {mine.model!r} "
                    f"({name}={getattr(mine, name)!r}); this run uses {other.model!r} "
                    f"({name}={getattr(other, name)!r}). Vectors of different models cannot be "
                    "mixed: use --model to match the store, or index into a new --store.")

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def _load_index(self) -> faiss.Index:
        path = self.root / INDEX_FILE
        if path.is_file():
            try:
                return index_choice.enable_lookup(faiss.read_index(str(path)))
            except RuntimeError:
                pass  # damaged cache: rebuilt from the vectors below
        return new_index(self.manifest.index_type, self.dim)

    # -- consistency -----------------------------------------------------------------------
    def reconcile(self) -> None:
        """Make the in-memory index hold exactly the ids that have vectors in SQLite."""
        with self.sessions() as session:
            db_ids = np.fromiter(session.scalars(select(VectorRow.image_id)), dtype=np.int64)
        index_ids = _index_ids(self.index)
        extra = np.setdiff1d(index_ids, db_ids, assume_unique=True)
        missing = np.setdiff1d(db_ids, index_ids, assume_unique=True)
        if extra.size:
            self._remove_from_index(extra)
        if missing.size and not self.index.is_trained:
            self.rebuild(self.manifest.index_type)  # trains on, and adds, every vector read once
        elif missing.size:
            self._add_to_index(missing, self.vectors(missing))
        self._dirty = bool(extra.size or missing.size)

    def _remove_from_index(self, ids: np.ndarray) -> None:
        """Remove ids; a graph index that cannot remove hides them, rebuilding only when
        they exceed ~2% of it (rebuilding an HNSW graph per changed file would cost minutes)."""
        if _supports_removal(self.index):
            self.index.remove_ids(ids)
            return
        self._tombstones = np.union1d(self._tombstones, ids)
        if self._tombstones.size > max(TOMBSTONE_MIN, TOMBSTONE_FRACTION * self.index.ntotal):
            self.rebuild(self.manifest.index_type)

    @property
    def count(self) -> int:
        """Live vectors in the index (hidden deleted ones not counted)."""
        return int(self.index.ntotal) - int(self._tombstones.size)

    def _add_to_index(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not self.index.is_trained:
            self.rebuild(self.manifest.index_type)
            return
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32),
                                np.ascontiguousarray(ids, np.int64))

    def rebuild(self, index_type: str) -> None:
        """Build a fresh index of ``index_type`` ("auto": chosen for the count) from the
        stored raw vectors; a type that needs more vectors to train than the store holds is
        searched exactly until it has them (see :meth:`index_status`)."""
        ids, vectors = self.all_vectors()
        auto = index_type == index_choice.AUTO or (
            self.manifest.index_auto and index_type == self.manifest.index_type)
        if index_type == index_choice.AUTO:
            choice = index_choice.choose_index(len(ids), self.dim)
            index_type, reason = choice.index_type, f"auto: {choice.reason}"
        else:
            reason = self.manifest.index_reason if auto else "chosen by the user"
        index, trained_on = new_index(index_type, self.dim), None
        if not index.is_trained:
            if len(ids) < self._training_minimum(index_type):
                index = new_index("Flat", self.dim)  # exact until there is enough to train on
            else:
                sample = index_choice.training_sample(vectors)
                try:
                    index.train(sample)
                except RuntimeError as exc:
                    raise StoreError(f"FAISS could not train index type {index_type!r} on "
                                     f"{len(sample):,} vectors: {str(exc).splitlines()[-1]}; "
                                     "choose another with `medsearch reindex --index-type`") from None
                trained_on = len(sample)
        if len(ids):
            index.add_with_ids(vectors, ids)
        self.index = index
        self._tombstones = np.zeros(0, np.int64)
        new = (index_type, auto, reason, trained_on)
        m = self.manifest
        if new != (m.index_type, m.index_auto, m.index_reason, m.index_trained_on):
            m.index_type, m.index_auto, m.index_reason, m.index_trained_on = new
            if not self.readonly:
                m.write(self.root / MANIFEST)
        self._dirty = True

    def index_status(self) -> dict:
        """The index actually in memory: the manifest's type, or exact search while that type
        waits for enough vectors to be trained."""
        needed = self._training_minimum(self.manifest.index_type)
        waiting = bool(needed) and isinstance(index_choice.inner_index(self.index), faiss.IndexFlat)
        return {"index_in_use": "Flat" if waiting else self.manifest.index_type,
                "index_trained_on": self.manifest.index_trained_on,
                "index_waiting_for": needed if waiting else None}

    def _training_minimum(self, index_type: str) -> int:
        if not index_choice.needs_training(index_type, self.dim):
            return 0
        return max(index_choice.training_minimum(index_type), 1)

    def _training_due(self) -> bool:
        status = self.index_status()
        if status["index_waiting_for"]:
            return self.count >= status["index_waiting_for"]
        return index_choice.retraining_due(self.manifest.index_type,
                                           self.manifest.index_trained_on, self.count)

    def save(self) -> None:
        """Write the index atomically if it changed; a kill mid-save keeps the old file."""
        if self.readonly or not self._dirty:
            return
        if self.manifest.index_auto:
            choice = index_choice.choose_index(self.count, self.dim)
            if choice.index_type != self.manifest.index_type:
                self.rebuild(index_choice.AUTO)  # the collection outgrew (or shrank below) it
            elif self.manifest.index_reason != f"auto: {choice.reason}":
                self.manifest.index_reason = f"auto: {choice.reason}"  # reason for today's size
                self.manifest.write(self.root / MANIFEST)
        if self._training_due():
            self.rebuild(self.manifest.index_type)
        tmp = self.root / (INDEX_FILE + ".tmp")
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / INDEX_FILE)
        _fsync_dir(self.root)
        self._dirty = False

    # -- writing ---------------------------------------------------------------------------
    @contextmanager
    def writer(self) -> Iterator[StoreWriter]:
        """A transaction; on success the FAISS index follows the committed rows."""
        if self.readonly:
            raise StoreError(f"store {self.root} was opened read-only")
        with self.sessions() as session, session.begin():
            writer = StoreWriter(self, session)
            yield writer
        if writer.removed:
            self._remove_from_index(np.asarray(writer.removed, np.int64))
            self._dirty = True
        if writer.added:
            ids = np.fromiter((i for i, _ in writer.added), dtype=np.int64)
            self._add_to_index(ids, np.stack([v for _, v in writer.added]))
            self._dirty = True

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Only one writing process at a time (readers never wait)."""
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"another process is writing to {self.root}; wait for it "
                                 "to finish") from None
            yield
        finally:
            os.close(fd)

    def setting(self, key: str, default: str | None = None) -> str | None:
        with self.sessions() as session:
            row = session.get(SettingRow, key)
            return row.value if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self.sessions() as session, session.begin():
            session.merge(SettingRow(key=key, value=value))

    def secret(self, key: str) -> bytes:
        """A random per-store secret (e.g. for the PHI HMAC), created on first use."""
        value = self.setting(key)
        if value is None:
            value = secrets.token_hex(32)
            self.set_setting(key, value)
        return bytes.fromhex(value)

    # -- reading ---------------------------------------------------------------------------
    def vectors(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Raw vectors for ``ids``, in that order (missing ids raise)."""
        ids = [int(i) for i in ids]
        found: dict[int, bytes] = {}
        table = VectorRow.__table__
        with self.engine.connect() as conn:  # Core rows: the ORM's per-row work is not needed
            for chunk in _chunks(ids):
                rows = conn.execute(select(table.c.image_id, table.c.vector)
                                    .where(table.c.image_id.in_(chunk)))
                found.update((image_id, blob) for image_id, blob in rows.all())
        missing = [i for i in ids if i not in found]
        if missing:
            raise StoreError(f"no stored vector for id(s) {missing[:10]}")
        return vectors_from_blobs([found[i] for i in ids], self.dim)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        with self.sessions() as session:
            rows = session.execute(select(VectorRow.image_id, VectorRow.vector)
                                   .order_by(VectorRow.image_id)).all()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, vectors_from_blobs([r[1] for r in rows], self.dim)

    def matching_ids(self, filters: Filters) -> np.ndarray:
        """Sorted ids of the rows the filters admit.

        SQLite joins them into one string: a Python row per id cost several times the query
        itself (10k ids: ~9 ms through SQLAlchemy rows, ~3 ms this way)."""
        selected = filters.query().subquery()
        with self.engine.connect() as conn:
            joined = conn.execute(select(func.group_concat(selected.c.id))).scalar()
        if not joined:
            return np.zeros(0, np.int64)
        return np.sort(np.fromstring(joined, dtype=np.int64, sep=","))

    def search(self, queries: np.ndarray, k: int,
               filters: Filters | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; ids are -1 where fewer than k exist."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise StoreError(f"query vectors are {queries.shape[1]}-d, the store holds {self.dim}-d")
        k = max(1, int(k))
        allowed = None if filters is None or filters.empty else self.matching_ids(filters)
        # exact path for Flat, bitmap filters with widened HNSW/IVF search, exact re-ranking
        # for PQ codes, deleted-but-not-removed graph entries hidden: retrieval/index_choice.py
        return index_choice.search(self.index, queries, k, allowed=allowed,
                                   fetch_vectors=self.vectors, hidden=self._tombstones,
                                   rerank=index_choice.rerank_for(self.manifest.index_type))

    def rows(self, ids: list[int]) -> dict[int, dict]:
        """Metadata of images by id, as plain dicts (path and frame included)."""
        if not ids:
            return {}
        images, files, labels = ImageRow.__table__, FileRow.__table__, LabelRow.__table__
        out: dict[int, dict] = {}
        with self.engine.connect() as conn:  # Core rows: a results page is on every query's path
            for chunk in _chunks(list(ids)):
                found: dict[int, list[dict]] = {}
                for row in conn.execute(select(labels.c.image_id, labels.c.label, labels.c.score,
                                               labels.c.source)
                                        .where(labels.c.image_id.in_(chunk))):
                    found.setdefault(row.image_id, []).append(
                        {"label": row.label, "score": row.score, "source": row.source})
                rows = conn.execute(select(images, files.c.path, files.c.source_kind)
                                    .join(files, files.c.id == images.c.file_id)
                                    .where(images.c.id.in_(chunk)))
                out.update((row["id"], image_dict(row, found.get(row["id"], [])))
                           for row in rows.mappings())
        return out

    def stats(self) -> dict:
        with self.sessions() as session:
            files = session.scalar(select(func.count()).select_from(FileRow))
            rows = session.scalar(select(func.count()).select_from(ImageRow))
            failures = session.scalar(select(func.count()).select_from(FailureRow))
            modalities = dict(session.execute(
                select(ImageRow.modality, func.count()).group_by(ImageRow.modality)).all())
        return {"files": files, "images": rows, "failures": failures,
                "modalities": {str(k): v for k, v in modalities.items()}}

    def close(self) -> None:
        self.save()
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def image_dict(row: RowMapping, labels: list[dict]) -> dict:
    """A result row (images joined with its file's path and kind) as the dict results carry."""
    meta = {c: row[c] for c in ("width", "height", *DICOM_FIELDS, "patient_key")}
    meta = {k: v for k, v in meta.items() if v is not None}
    meta["source_kind"] = row["source_kind"]
    meta["labels"] = labels
    return {"id": row["id"], "path": row["path"], "frame": row["frame"], "metadata": meta}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")      # readers keep working while an index run writes
    cursor.execute("PRAGMA synchronous=NORMAL")    # WAL + NORMAL survives a killed process
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def known_files(store: Store, roots: list[str]) -> dict[str, tuple[int, int, str]]:
    """path → (size, mtime_ns, content_hash) of stored sources under any of ``roots``."""
    from sqlalchemy import or_

    clauses = []
    for root in roots:
        prefix = root.rstrip(os.sep) + os.sep
        clauses += [FileRow.path == root, func.substr(FileRow.path, 1, len(prefix)) == prefix]
    with store.sessions() as session:
        rows = session.execute(select(FileRow.path, FileRow.size, FileRow.mtime_ns,
                                      FileRow.content_hash).where(or_(*clauses))).all()
    return {path: (size, mtime, digest) for path, size, mtime, digest in rows}
