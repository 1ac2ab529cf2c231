"""A store directory: FAISS index + SQLite metadata + raw vectors + manifest, kept in step.

SQLite is the source of truth: rows and their raw vectors are written in one transaction.
The FAISS file is a derived cache written atomically (temp file + rename); on open it is
reconciled with the database by id, so a process killed at any moment leaves a store that
opens with index and rows agreeing.

Integrity (issue 13): every byte of the index file goes through Python's own writes, so a
full disk raises instead of leaving a short file to be renamed over the good one; the
manifest records the file's size, checksums and id count, and every open checks them while
reading (a damaged file is never searched: it is rebuilt from the SQLite vectors). Ids are
never handed out twice, even when the last commit was lost (see :meth:`Store._guard_ids`).
The store folder is owner-only (0700) and its files 0600, whatever the umask.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
from sqlalchemy import RowMapping, create_engine, delete, event, func, insert, select, text
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
#: Owner-only: the store holds patient metadata (issue 13, defect 8).
DIR_MODE, FILE_MODE = 0o700, 0o600
#: errno values that mean "no room": reported as "disk full" with the file's name.
NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


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
    phi_key_fingerprint: str | None = None  # the patient-key file's (retrieval.privacy); never the key
    format_version: int = FORMAT_VERSION
    schema_version: int = SCHEMA_VERSION
    created_at: float = field(default_factory=time.time)
    # The index file as last saved (None: not recorded, e.g. a store older than issue 13):
    # checked at every open (size, id count, crc32) and by `medsearch check` (sha256).
    index_size: int | None = None
    index_count: int | None = None
    index_crc32: int | None = None
    index_sha256: str | None = None
    index_previous: dict | None = None  # the record before the last save (see _index_records)
    #: The highest image id ever handed out: new rows start above it (ids are never reused).
    id_high_water: int = 0

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


def _temp_name(path: Path) -> Path:
    """A temp name no other process or thread uses: two writers never share one."""
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_temp_name(name: str) -> bool:
    return name.endswith(".tmp") and name.startswith((MANIFEST + ".", INDEX_FILE + "."))


def _write_error(path: Path, exc: OSError) -> StoreError:
    if exc.errno in NO_SPACE:
        return StoreError(f"could not write {path}: disk full ({exc.strerror}); the previous "
                          "file is kept. Free some space and run the command again")
    return StoreError(f"could not write {path}: {exc.strerror or exc}; the previous file is kept")


def _write_all(fd: int, data) -> None:
    """os.write until every byte is written: a short write or an error never passes silently."""
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _AtomicFile:
    """Bytes written to a unique owner-only temp file, then fsynced and renamed over ``path``.

    Every error (ENOSPC, EFBIG, EIO …) raises a StoreError naming ``path``; the temp file is
    removed and the old file stays. Sizes and checksums of what was written are kept so the
    caller can verify the file before it replaces the old one."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, _temp_name(path)
        self.size, self.crc, self.sha = 0, 0, hashlib.sha256()
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)

    def write(self, data) -> None:
        _write_all(self.fd, data)
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)
        self.sha.update(data)

    def finish(self, verify: bool = False) -> None:
        """fsync and close the temp file; ``verify``: read it back and compare."""
        os.fchmod(self.fd, FILE_MODE)  # the umask neither widens nor narrows it
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if verify:  # what is on disk is what was written: a short file never replaces a good one
            if file_checksums(self.tmp) != (self.size, self.crc, self.sha.hexdigest()):
                raise OSError(errno.EIO, "the file read back differs from what was written")

    def replace(self) -> None:
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    try:
        out = _AtomicFile(path)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        out.write(data)
        out.finish()
        out.replace()
    except OSError as exc:
        out.abort()
        raise _write_error(path, exc) from None
    except BaseException:
        out.abort()
        raise


def file_checksums(path: Path) -> tuple[int, int, str]:
    """(size, crc32, sha256 hex) of a file, read in chunks."""
    size, crc, sha = 0, 0, hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
            sha.update(chunk)
    return size, crc, sha.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (the entry lives in the folder)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _index_records(manifest: Manifest) -> list[dict]:
    """The index files the manifest vouches for: the last saved, and the one before it (a
    kill between the manifest's write and the file's rename leaves the older file in place)."""
    m = manifest
    records = []
    if m.index_size is not None:
        records.append({"size": m.index_size, "count": m.index_count, "crc32": m.index_crc32,
                        "sha256": m.index_sha256})
    if m.index_previous:
        records.append(m.index_previous)
    return records


def read_index_file(path: Path, manifest: Manifest, *,
                    full: bool = False) -> tuple[faiss.Index | None, str | None]:
    """Load the index file and check it against the manifest: (index, None) or (None, why).

    The size is checked before reading, the crc32 (and with ``full`` the sha256) while the
    bytes stream through FAISS's reader (no second pass, no extra copy), and the id count
    after. A manifest older than these fields (no record) is checked for readability only."""
    records = _index_records(manifest)
    if not path.is_file():
        if any(r.get("count") for r in records):
            return None, "the file is missing"
        return None, None  # never saved: a new or empty store
    size = path.stat().st_size
    if records and size not in {r["size"] for r in records}:
        return None, (f"it is {size:,} bytes where the manifest records "
                      f"{records[0]['size']:,} (truncated or overwritten)")
    crc, sha = 0, hashlib.sha256() if full else None
    try:
        with open(path, "rb") as fh:
            def read(n: int) -> bytes:
                nonlocal crc
                data = fh.read(n)
                crc = zlib.crc32(data, crc)
                if sha is not None:
                    sha.update(data)
                return data

            try:
                index = faiss.read_index(faiss.PyCallbackIOReader(read, _CHUNK))
            except RuntimeError as exc:
                return None, f"it is not a readable FAISS index ({str(exc).splitlines()[-1][-120:]})"
            while read(_CHUNK):  # trailing bytes count in the checksum too
                pass
    except OSError as exc:
        return None, f"it cannot be read ({exc.strerror or exc})"
    matching = [r for r in records if r["size"] == size]
    if matching:
        if not any(r.get("crc32") is None or r["crc32"] == crc for r in matching):
            return None, "its checksum differs from the manifest's (damaged on disk)"
        if full and not any(r.get("sha256") is None or r["sha256"] == sha.hexdigest()
                            for r in matching):
            return None, "its sha256 differs from the manifest's (damaged on disk)"
        if not any(r.get("count") is None or r["count"] == index.ntotal for r in matching):
            return None, (f"it holds {index.ntotal:,} ids where the manifest records "
                          f"{matching[0]['count']:,}")
    return index, None


def _acquire_lock(root: Path, *, wait: bool = False) -> int:
    """The store's writer lock (flock on write.lock, released when the fd closes or the
    process dies): one writing process at a time; readers never take it."""
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as exc:
        raise StoreError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"another process is writing to {root} (it holds {path}); wait for "
                         "it to finish and run the command again") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        pass  # another user's lock file: the lock still works
    return fd


def _remove_stale_temps(root: Path) -> None:
    """Temp files of processes that died mid-write (their pid is in the name)."""
    for entry in root.iterdir():
        if not is_temp_name(entry.name):
            continue
        try:
            pid = int(entry.name.split(".")[-3])
            os.kill(pid, 0)
            continue  # still running: its file
        except (ValueError, IndexError):
            pass
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            entry.unlink()
        except OSError:
            pass


def _create_private_file(path: Path) -> None:
    """An empty owner-only file (SQLite gives its -wal and -shm files the same mode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
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


def _make_folder(root: Path) -> None:
    """The store folder, owner-only when this process makes it."""
    if not root.exists():
        try:
            root.mkdir(parents=True, mode=DIR_MODE)
        except FileExistsError:
            return  # another run made it first; the lock decides who creates the store
        except OSError as exc:
            raise StoreError(f"cannot create the store folder {root}: {exc.strerror or exc}") from None
        os.chmod(root, DIR_MODE)
    elif not root.is_dir():
        raise StoreError(f"{root} is a file, not a folder; choose a folder for the store")


def _database_has_rows(path: Path) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(path) as con:
            return bool(con.execute("SELECT EXISTS (SELECT 1 FROM files)").fetchone()[0])
    except sqlite3.Error:
        return False


def _max_id(index: faiss.Index) -> int:
    ids = _index_ids(index)
    return int(ids.max()) if ids.size else 0


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
        self.store._guard_ids(self.session)
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

    def __init__(self, root: Path, manifest: Manifest, *, readonly: bool = False,
                 full_check: bool = False, lock_fd: int | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.readonly = readonly
        if not readonly and not (root / DATABASE).exists():
            _create_private_file(root / DATABASE)
        self.engine = create_engine(f"sqlite:///{root / DATABASE}",
                                    hide_parameters=True)  # no query data in logs
        event.listen(self.engine, "connect", _sqlite_pragmas)
        self._migrate()
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._lock_fd: int | None = lock_fd  # the writer lock, when this store holds it
        #: Deleted ids still inside an index that cannot remove (HNSW): hidden from results
        #: until enough pile up to be worth a rebuild.
        self._tombstones = np.zeros(0, np.int64)
        #: Why the index file on disk could not be used (None: it was fine or absent).
        self.index_problem: str | None = None
        self.index = self._load_index(full_check)
        self._high_water = max(manifest.id_high_water, _max_id(self.index), self._db_max_id())
        self._dirty = False
        self.reconcile()
        if self.index_problem:
            self._dirty = True
            if not readonly:
                self._save_if_unlocked()
        if not readonly:  # a patient-key secret kept in the database moves out of the store
            from .privacy import migrate_legacy

            migrate_legacy(self)

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
    def create(cls, root: str | Path, manifest: Manifest, *, exclusive: bool = False) -> "Store":
        """A new store in an empty (or new) folder, made under the writer lock so two runs
        never both create it; ``exclusive``: keep the lock until :meth:`close`."""
        root = Path(root)
        _make_folder(root)
        fd = _acquire_lock(root)
        try:
            store = cls._create_locked(root, manifest, fd)
        except BaseException:
            os.close(fd)
            raise
        if not exclusive:
            store._lock_fd = None
            os.close(fd)
        return store

    @classmethod
    def _create_locked(cls, root: Path, manifest: Manifest, lock_fd: int) -> "Store":
        if (root / MANIFEST).exists():
            raise StoreError(f"{root} already holds a store; open it instead")
        ours = {LOCK_FILE, DATABASE, DATABASE + "-wal", DATABASE + "-shm", DATABASE + "-journal"}
        others = [p.name for p in root.iterdir() if p.name not in ours and not is_temp_name(p.name)]
        if others:
            raise StoreError(f"{root} exists and is not empty; choose a new folder for the store")
        if (root / DATABASE).exists() and _database_has_rows(root / DATABASE):
            raise StoreError(f"{root} holds a {DATABASE} with indexed files but no {MANIFEST}; "
                             "restore the manifest or choose a new folder for the store")
        _remove_stale_temps(root)
        os.chmod(root, DIR_MODE)
        if manifest.index_type == index_choice.AUTO:
            choice = index_choice.choose_index(0, manifest.dim)
            manifest.index_type, manifest.index_auto = choice.index_type, True
            manifest.index_reason = f"auto: {choice.reason}"
        new_index(manifest.index_type, manifest.dim)  # validate before writing anything
        store = cls(root, manifest, lock_fd=lock_fd)
        manifest.write(root / MANIFEST)  # last: a reader sees a store only once it is whole
        return store

    @classmethod
    def open(cls, root: str | Path, *, readonly: bool = False, exclusive: bool = False,
             full_check: bool = False, _lock_fd: int | None = None) -> "Store":
        """Open a store; ``exclusive``: take the writer lock first and hold it until
        :meth:`close`; ``full_check``: also verify the index file's sha256."""
        root = Path(root)
        if not (root / MANIFEST).is_file():
            raise StoreError(f"no store at {root} (no {MANIFEST}); create one with "
                             f"`medsearch index PATH --store {root}`")
        fd = _acquire_lock(root) if exclusive else _lock_fd
        try:
            manifest = Manifest.read(root / MANIFEST)
            if manifest.format_version > FORMAT_VERSION or manifest.schema_version > SCHEMA_VERSION:
                raise StoreError(f"store {root} was written by a newer medsearch (format "
                                 f"{manifest.format_version}, schema {manifest.schema_version}); "
                                 "upgrade medsearch to open it")
            if fd is not None:
                _remove_stale_temps(root)
            store = cls(root, manifest, readonly=readonly, full_check=full_check, lock_fd=fd)
        except BaseException:
            if exclusive:
                os.close(fd)
            raise
        return store

    @classmethod
    def open_or_create(cls, root: str | Path, manifest: Manifest, *,
                       exclusive: bool = False) -> "Store":
        """Open the store at ``root`` (refusing another model's) or create it.

        ``exclusive=True`` (what an index run wants) takes the writer lock before looking, so
        the check "is there a store?" and the creation are one step no other run can split;
        the lock is held until :meth:`close`."""
        root = Path(root)
        if exclusive:
            _make_folder(root)
            fd = _acquire_lock(root)
            try:
                if (root / MANIFEST).is_file():
                    store = cls.open(root, _lock_fd=fd)
                    store.check_compatible(manifest)
                else:
                    store = cls._create_locked(root, manifest, fd)
            except BaseException:
                os.close(fd)
                raise
            return store
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

    def _load_index(self, full_check: bool = False) -> faiss.Index:
        """The saved index if it passes the manifest's checks; never a damaged one."""
        path = self.root / INDEX_FILE
        index, problem = read_index_file(path, self.manifest, full=full_check)
        if problem:
            self._index_damaged(problem)
        if index is not None and not self._index_type_matches(index):
            # a kill between the manifest naming a new type (reindex) and the index file of
            # that type being saved leaves the old file: rebuilt, as the manifest says
            self._index_damaged(f"it holds another index type than {self.manifest.index_type}")
            index = None
        if index is not None:
            return index_choice.enable_lookup(index)
        return new_index(self.manifest.index_type, self.dim)

    def _index_type_matches(self, index: faiss.Index) -> bool:
        """The file holds the manifest's index type (or exact Flat while that type waits for
        enough vectors to be trained)."""
        empty = new_index(self.manifest.index_type, self.dim)
        got, want = index_choice.inner_index(index), index_choice.inner_index(empty)
        return isinstance(got, type(want)) or (isinstance(got, faiss.IndexFlat)
                                               and not empty.is_trained)

    def _index_damaged(self, problem: str) -> None:
        path = self.root / INDEX_FILE
        self.index_problem = problem
        if self.readonly:
            log.warning("index file %s is not used: %s; searching an index rebuilt in memory "
                        "from the stored vectors. Run `medsearch repair --store %s` to fix "
                        "the file", path, problem, self.root)
        else:
            log.warning("index file %s is not used: %s; rebuilding it from the vectors in %s",
                        path, problem, self.root / DATABASE)

    def verify_index_file(self) -> str | None:
        """Check the index file on disk in full (size, crc32, sha256, id count); on a problem
        the store stops using what it loaded and rebuilds from the vectors (in memory when
        read-only). Returns the problem, or None. Run at `medsearch check` and server start."""
        index, problem = read_index_file(self.root / INDEX_FILE, self.manifest, full=True)
        del index
        if problem and self.index_problem is None:
            self._index_damaged(problem)
            self.index = new_index(self.manifest.index_type, self.dim)
            self._tombstones = np.zeros(0, np.int64)
            self.reconcile()
            self._dirty = True
            if not self.readonly:
                self._save_if_unlocked()
        return problem

    def _save_if_unlocked(self) -> None:
        """Save a repaired index now unless another process holds the writer lock (that
        process saves its own, whole index when it finishes)."""
        if self._lock_fd is not None:
            self.save()
            return
        try:
            fd = _acquire_lock(self.root)
        except StoreError:
            return
        try:
            self.save()
        finally:
            os.close(fd)

    def _db_max_id(self) -> int:
        """The highest image id SQLite has handed out (its AUTOINCREMENT counter)."""
        with self.engine.connect() as conn:
            seq = conn.exec_driver_sql(
                "SELECT seq FROM sqlite_sequence WHERE name = 'images'").scalar()
            top = conn.scalar(select(func.max(ImageRow.id)))
        return max(int(seq or 0), int(top or 0))

    def _guard_ids(self, session: Session) -> None:
        """Start new ids above every id ever handed out, not only those SQLite remembers.

        images.id is AUTOINCREMENT, but its counter lives in the same database: when the last
        commit is lost (power cut under synchronous=NORMAL) or an older copy of the database is
        restored, the counter goes back while the saved FAISS file still holds the lost ids,
        and a new image taking such an id would be found by the lost image's vector. The
        high-water mark is the max of the manifest's ``id_high_water`` (saved with each index)
        and the ids in the index file as loaded; raising sqlite_sequence to it makes SQLite
        hand out only fresh ids. (No schema change is needed, so no Alembic revision.)"""
        hw = int(self._high_water)
        if hw <= 0:
            return
        session.execute(text("UPDATE sqlite_sequence SET seq = :hw "
                             "WHERE name = 'images' AND seq < :hw"), {"hw": hw})
        session.execute(text("INSERT INTO sqlite_sequence (name, seq) SELECT 'images', :hw "
                             "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence "
                             "WHERE name = 'images')"), {"hw": hw})

    # -- consistency -----------------------------------------------------------------------
    def reconcile(self) -> None:
        """Make the in-memory index hold exactly the ids that have vectors in SQLite.

        The ids and the vectors to add are read in one read transaction: a reader sees the
        rows of a whole committed batch or none of it, never a write half-way."""
        table = VectorRow.__table__
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")  # one snapshot for both reads (WAL: writers go on)
            db_ids = np.fromiter(conn.scalars(select(table.c.image_id)
                                              .where(self._whole_vector(table))), dtype=np.int64)
            index_ids = _index_ids(self.index)
            extra = np.setdiff1d(index_ids, db_ids, assume_unique=True)
            missing = np.setdiff1d(db_ids, index_ids, assume_unique=True)
            vectors = (self._read_vectors(conn, missing)
                       if missing.size and self.index.is_trained else None)
        if extra.size:
            self._remove_from_index(extra)
        if missing.size and vectors is None:
            self.rebuild(self.manifest.index_type)  # trains on, and adds, every vector read once
        elif missing.size:
            self._add_to_index(missing, vectors)
        self._dirty = self._dirty or bool(extra.size or missing.size)

    def _whole_vector(self, table):
        """Vectors of this store's size (a wrong-sized blob is never indexed: `repair` lists it)."""
        return func.length(table.c.vector) == self.dim * 4

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
        self._write_index()
        self._dirty = False

    def _write_index(self) -> None:
        """Write the index so that every error raises and a bad file never replaces a good one.

        The bytes go through os.write to a unique owner-only temp file (faiss.write_index
        reports a failed close only on stderr), are read back and compared, fsynced; then the
        manifest records the new file (keeping the previous record, see _index_records), and
        only then is the file renamed into place and the folder fsynced."""
        path = self.root / INDEX_FILE
        try:
            out = _AtomicFile(path)
        except OSError as exc:
            raise _write_error(path, exc) from None
        before = asdict(self.manifest)
        try:
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(out.write, _CHUNK))
            out.finish(verify=True)
            m = self.manifest
            records = _index_records(m)
            m.index_previous = records[0] if records else None
            m.index_size, m.index_count = out.size, int(self.index.ntotal)
            m.index_crc32, m.index_sha256 = out.crc, out.sha.hexdigest()
            self._high_water = max(self._high_water, _max_id(self.index))
            m.id_high_water = int(self._high_water)
            m.write(self.root / MANIFEST)
            out.replace()
        except OSError as exc:
            out.abort()
            self.manifest.__dict__.update(before)
            raise _write_error(path, exc) from None
        except BaseException:
            out.abort()
            self.manifest.__dict__.update(before)
            raise

    # -- writing ---------------------------------------------------------------------------
    @contextmanager
    def writer(self) -> Iterator[StoreWriter]:
        """A transaction; on success the FAISS index follows the committed rows."""
        if self.readonly:
            raise StoreError(f"store {self.root} was opened read-only")
        with self.sessions() as session, session.begin():
            writer = StoreWriter(self, session)
            yield writer
        if writer.added:
            self._high_water = max(self._high_water, max(i for i, _ in writer.added))
        if writer.removed:
            self._remove_from_index(np.asarray(writer.removed, np.int64))
            self._dirty = True
        if writer.added:
            ids = np.fromiter((i for i, _ in writer.added), dtype=np.int64)
            self._add_to_index(ids, np.stack([v for _, v in writer.added]))
            self._dirty = True

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Only one writing process at a time (readers never wait); a no-op when this store
        already holds the lock (opened with ``exclusive=True``)."""
        if self._lock_fd is not None:
            yield
            return
        fd = _acquire_lock(self.root)
        self._lock_fd = fd
        try:
            yield
        finally:
            if self._lock_fd == fd:  # not already released by close() inside the block
                self._lock_fd = None
                os.close(fd)

    @property
    def holds_lock(self) -> bool:
        return self._lock_fd is not None

    # -- integrity -------------------------------------------------------------------------
    def check(self) -> dict:
        """Rows against vectors against the index file on disk, and the file's checksums.

        Returns {ok, problems, reembed, counts}: ``problems`` say what is wrong and what to
        run; ``reembed`` lists the sources whose vectors are missing or of the wrong size
        (only re-embedding can fix those: `medsearch repair --drop` then `medsearch index`)."""
        problems: list[str] = []
        images, vectors, files = ImageRow.__table__, VectorRow.__table__, FileRow.__table__
        with self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN")
            quick = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check").all()]
            if quick != ["ok"]:
                problems.append(f"database {self.root / DATABASE} is damaged ({'; '.join(quick[:3])}); "
                                "restore it from a backup (`medsearch backup`)")
            counts = {
                "files": conn.scalar(select(func.count()).select_from(files)),
                "images": conn.scalar(select(func.count()).select_from(images)),
                "vectors": conn.scalar(select(func.count()).select_from(vectors)),
            }
            good = np.fromiter(conn.scalars(select(vectors.c.image_id)
                                            .where(self._whole_vector(vectors))
                                            .order_by(vectors.c.image_id)), dtype=np.int64)
            broken = conn.execute(
                select(images.c.id, files.c.path)
                .join(files, files.c.id == images.c.file_id)
                .outerjoin(vectors, vectors.c.image_id == images.c.id)
                .where((vectors.c.image_id.is_(None)) | ~self._whole_vector(vectors))).all()
            orphans = conn.scalar(select(func.count()).select_from(vectors).where(
                ~vectors.c.image_id.in_(select(images.c.id))))
            db_max = self._db_max_id()
        counts["vectors_ok"] = int(good.size)
        reembed = sorted({path for _, path in broken})
        if broken:
            problems.append(f"{len(broken)} image(s) in {len(reembed)} file(s) have no vector of "
                            f"{self.dim} values; they must be re-embedded: run `medsearch "
                            "repair --drop` and then `medsearch index` on them")
        if orphans:
            problems.append(f"{orphans} vector(s) belong to no image; run `medsearch repair`")
        path = self.root / INDEX_FILE
        index, problem = read_index_file(path, self.manifest, full=True)
        counts["index"] = None if index is None else int(index.ntotal)
        if problem:
            problems.append(f"index file {path}: {problem}; run `medsearch repair` to rebuild it")
        elif index is None and good.size:
            problems.append(f"index file {path} is missing; run `medsearch repair` to build it")
        elif index is not None:
            ids = np.sort(_index_ids(index))
            stale = np.setdiff1d(ids, good, assume_unique=True)
            lacking = np.setdiff1d(good, ids, assume_unique=True)
            if _supports_removal(index) and stale.size:
                problems.append(f"index file {path} holds {stale.size} id(s) with no row "
                                f"(e.g. {stale[:5].tolist()}); run `medsearch repair`")
            if lacking.size:
                problems.append(f"index file {path} lacks {lacking.size} stored vector(s) "
                                f"(e.g. {lacking[:5].tolist()}); run `medsearch repair`")
            if self.manifest.index_size is None:
                problems.append(f"the manifest records no checksum for {path}; run "
                                "`medsearch repair` to record one")
            top = max(_max_id(index), db_max)
            if self.manifest.id_high_water < _max_id(index):
                problems.append(f"the manifest's id high-water mark {self.manifest.id_high_water} "
                                f"is below the index's ids (up to {top}); run `medsearch repair`")
        return {"ok": not problems, "store": str(self.root), "problems": problems,
                "reembed": reembed, "counts": counts}

    def repair(self, *, drop: bool = False) -> dict:
        """Rebuild what is derived: the index file and the manifest's record of it, the id
        high-water mark, owner-only modes. ``drop``: delete the sources that must be
        re-embedded, so the next `medsearch index` embeds them again. Needs the writer lock."""
        if self.readonly:
            raise StoreError(f"store {self.root} was opened read-only")
        with self.exclusive():
            before = self.check()
            dropped: list[str] = []
            if drop and before["reembed"]:
                with self.writer() as w:
                    w.remove_files(before["reembed"])
                dropped = before["reembed"]
            with self.sessions() as session, session.begin():
                self._guard_ids(session)
            self.rebuild(self.manifest.index_type)
            self.save()
            os.chmod(self.root, DIR_MODE)
            for entry in self.root.iterdir():
                if entry.is_file() and entry.stat().st_uid == os.getuid():
                    os.chmod(entry, FILE_MODE)
            after = self.check()
        return {"ok": after["ok"], "store": str(self.root), "fixed": before["problems"],
                "problems": after["problems"], "dropped": dropped,
                "reembed": after["reembed"], "counts": after["counts"]}

    def setting(self, key: str, default: str | None = None) -> str | None:
        with self.sessions() as session:
            row = session.get(SettingRow, key)
            return row.value if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self.sessions() as session, session.begin():
            session.merge(SettingRow(key=key, value=value))

    # -- reading ---------------------------------------------------------------------------
    def vectors(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Raw vectors for ``ids``, in that order (missing ids raise)."""
        with self.engine.connect() as conn:  # Core rows: the ORM's per-row work is not needed
            return self._read_vectors(conn, ids)

    def _read_vectors(self, conn, ids: np.ndarray | list[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        found: dict[int, bytes] = {}
        table = VectorRow.__table__
        for chunk in _chunks(ids):
            rows = conn.execute(select(table.c.image_id, table.c.vector)
                                .where(table.c.image_id.in_(chunk), self._whole_vector(table)))
            found.update((image_id, blob) for image_id, blob in rows.all())
        missing = [i for i in ids if i not in found]
        if missing:
            raise StoreError(f"no stored vector for id(s) {missing[:10]}")
        return vectors_from_blobs([found[i] for i in ids], self.dim)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        table = VectorRow.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(select(table.c.image_id, table.c.vector)
                                .where(self._whole_vector(table))
                                .order_by(table.c.image_id)).all()
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
        """Save (if changed), release the engine, then the writer lock if held."""
        try:
            self.save()
        finally:
            self.engine.dispose()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

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


def backup(root: str | Path, dest: str | Path) -> dict:
    """A consistent copy of a store that may be in use, into a new (or empty) folder.

    The database is copied with SQLite's online backup API (one snapshot, writers go on);
    the index file and manifest are copied as a pair (the manifest read before and after the
    copy must agree and vouch for the copied file's checksum, else the copy goes without an
    index). The copy is then opened under its own lock, reconciled with its database and
    saved, so its index, manifest and rows are of the same moment; returns its `check`."""
    import shutil
    import sqlite3

    root, dest = Path(root), Path(dest)
    if not (root / MANIFEST).is_file():
        raise StoreError(f"no store at {root} (no {MANIFEST})")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StoreError(f"{dest} exists and is not empty; back up into a new folder")
    _make_folder(dest)
    os.chmod(dest, DIR_MODE)
    _create_private_file(dest / DATABASE)
    try:
        src = sqlite3.connect(root / DATABASE, timeout=30)
        dst = sqlite3.connect(dest / DATABASE)
        try:
            src.backup(dst)  # pages=-1: the whole database in one step, one snapshot
        finally:
            dst.close()
            src.close()
    except sqlite3.Error as exc:
        raise StoreError(f"could not copy {root / DATABASE} to {dest}: {exc}") from None
    except OSError as exc:
        raise _write_error(dest / DATABASE, exc) from None
    manifest_bytes = None
    for _ in range(5):
        first = (root / MANIFEST).read_bytes()
        index_copy = _temp_name(dest / INDEX_FILE)
        try:
            shutil.copyfile(root / INDEX_FILE, index_copy)
        except FileNotFoundError:
            index_copy.unlink(missing_ok=True)
        except OSError as exc:
            index_copy.unlink(missing_ok=True)
            raise _write_error(dest / INDEX_FILE, exc) from None
        if (root / MANIFEST).read_bytes() != first:
            continue  # a save landed meanwhile: copy the pair again
        manifest = Manifest(**json.loads(first))
        if index_copy.exists():
            index, problem = read_index_file(index_copy, manifest, full=True)
            if problem or index is None:
                index_copy.unlink()
                continue
            os.chmod(index_copy, FILE_MODE)
            os.replace(index_copy, dest / INDEX_FILE)
        manifest_bytes = first
        break
    if manifest_bytes is None:  # no agreeing pair: the copy builds its index from its rows
        manifest = Manifest(**json.loads((root / MANIFEST).read_bytes()))
        for name in ("index_size", "index_count", "index_crc32", "index_sha256", "index_previous"):
            setattr(manifest, name, None)
        (dest / INDEX_FILE).unlink(missing_ok=True)
        manifest_bytes = json.dumps(asdict(manifest), indent=2).encode()
    _atomic_write_bytes(dest / MANIFEST, manifest_bytes)
    copy = Store.open(dest, exclusive=True)
    try:
        copy._dirty = True  # record the copy's own index (its rows may be newer than the file)
        copy.save()
        report = copy.check()
    finally:
        copy.close()
    return {**report, "source": str(root), "backup": str(dest)}
