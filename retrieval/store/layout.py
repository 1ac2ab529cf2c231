"""The store's folder on disk: manifest, writer lock, owner-only atomic checksummed files.

Every file the store writes goes through :class:`AtomicFile` (a unique owner-only temp file,
fsynced, renamed, folder fsynced), so a full disk or a kill never leaves a short file in place
of a good one; the folder is 0700 and its files 0600 whatever the umask.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ModelMismatchError, StoreBusyError, StoreError
from .schema import SCHEMA_VERSION

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "meta.sqlite"
INDEX_FILE = "index.faiss"
LOCK_FILE = "write.lock"
DEFAULT_INDEX_TYPE = "Flat"
#: Owner-only: the store holds patient metadata.
DIR_MODE, FILE_MODE = 0o700, 0o600
#: errno values that mean "no room": reported as "disk full" with the file's name.
NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
CHUNK = 1 << 20


@dataclass
class Manifest:
    """What every vector in the store was made with; a mismatch is refused, never mixed."""

    model: str
    model_revision: str
    model_fingerprint: str
    dim: int
    preprocessing_version: str
    index_type: str = DEFAULT_INDEX_TYPE
    index_auto: bool = False        # re-chosen from the vector count (retrieval.ann.policy)
    index_reason: str = ""          # why this index type (shown by `medsearch info`)
    index_trained_on: int | None = None  # vectors the IVF/PQ/SQ index was trained on (None: unknown)
    phi_key_fingerprint: str | None = None  # the patient-key file's (retrieval.privacy); never the key
    format_version: int = FORMAT_VERSION
    schema_version: int = SCHEMA_VERSION
    created_at: float = field(default_factory=time.time)
    # The index file as last saved (None: not recorded by the medsearch that wrote the store):
    # checked at every open (size, id count, crc32) and by `medsearch check` (sha256).
    index_size: int | None = None
    index_count: int | None = None
    index_crc32: int | None = None
    index_sha256: str | None = None
    index_previous: dict | None = None  # the record before the last save (vectors.index_records)
    #: The rows the file was saved from (their vectors' token; None: not known) and the removed
    #: ids it still holds: an open whose rows have that token trusts the file's ids as they are.
    index_token: str | None = None
    index_hidden: list[int] | None = None
    #: The index's layout as last saved: 1 = the one file index.faiss (records above); N > 1 =
    #: shard files index.faiss.0 … N-1 holding the ids with id % N == shard, one record each
    #: ({size, count, crc32, sha256, previous}) in ``index_shard_files`` (store/shards.py).
    index_shards: int = 1
    index_shard_files: list[dict] | None = None
    #: The highest image id ever handed out: new rows start above it (ids are never reused).
    id_high_water: int = 0
    #: The decode settings the vectors were made with ({"window", "frames", "series_vectors"});
    #: None: not recorded (the store opens with the defaults).
    decode: dict | None = None
    #: Where the rows live: None for SQLite in this folder, else the PostgreSQL URL (no
    #: password) the store was created or adopted with; the folder then holds a cache.
    database: str | None = None

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise StoreError(f"{path} is not a readable store manifest ({exc}); "
                             "the store must be a folder made by `medsearch index`",
                             setting="store") from None

    def write(self, path: Path) -> None:
        atomic_write_bytes(path, json.dumps(asdict(self), indent=2).encode())

    def check_compatible(self, other: "Manifest", root: Path) -> None:
        """Refuse vectors from another model, weights, dimension or preprocessing."""
        for name in ("model_fingerprint", "dim", "preprocessing_version"):
            if getattr(self, name) != getattr(other, name):
                raise ModelMismatchError(
                    f"store {root} was built with model {self.model!r} "
                    f"({name}={getattr(self, name)!r}); this run uses {other.model!r} "
                    f"({name}={getattr(other, name)!r}). Vectors of different models cannot be "
                    "mixed: use the store's model, or index into a new store.")


def manifest_for(encoder, index_type: str) -> Manifest:
    """The manifest for vectors made by a VisionEncoder (local folders by absolute path)."""
    from ..model.names import PREPROCESSING_VERSION

    ckpt = encoder.checkpoint
    name = str(ckpt.path) if ckpt.revision == "local" else ckpt.name
    return Manifest(model=name, model_revision=ckpt.revision, model_fingerprint=ckpt.fingerprint,
                    dim=encoder.dim, preprocessing_version=PREPROCESSING_VERSION,
                    index_type=index_type)



def temp_name(path: Path) -> Path:
    """A temp name no other process or thread uses: two writers never share one."""
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_temp_name(name: str) -> bool:
    return name.endswith(".tmp") and name.startswith((MANIFEST + ".", INDEX_FILE + "."))


def write_error(path: Path, exc: OSError) -> StoreError:
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


class AtomicFile:
    """Bytes written to a unique owner-only temp file, then fsynced and renamed over ``path``.

    Every error (ENOSPC, EFBIG, EIO …) raises a StoreError naming ``path``; the temp file is
    removed and the old file stays. Sizes and checksums of what was written are kept so the
    caller can verify the file before it replaces the old one."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, temp_name(path)
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    try:
        out = AtomicFile(path)
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        out.write(data)
        out.finish()
        out.replace()
    except OSError as exc:
        out.abort()
        raise write_error(path, exc) from None
    except BaseException:
        out.abort()
        raise


def file_checksums(path: Path) -> tuple[int, int, str]:
    """(size, crc32, sha256 hex) of a file, read in chunks."""
    size, crc, sha = 0, 0, hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
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



def acquire_lock(root: Path, *, wait: bool = False) -> int:
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
        raise StoreBusyError(f"another process is writing to {root} (it holds {path}); wait for "
                         "it to finish and run the command again") from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        pass  # another user's lock file: the lock still works
    return fd


def remove_stale_temps(root: Path) -> None:
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


def create_private_file(path: Path) -> None:
    """An empty owner-only file (SQLite gives its -wal and -shm files the same mode)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)



def check_new_store_folder(root: Path) -> None:
    """Refuse to create a store in a folder that holds anything but a lock or a bare database."""
    if (root / MANIFEST).exists():
        raise StoreError(f"{root} already holds a store; open it instead")
    ours = {LOCK_FILE, DATABASE, DATABASE + "-wal", DATABASE + "-shm", DATABASE + "-journal"}
    others = [p.name for p in root.iterdir() if p.name not in ours and not is_temp_name(p.name)]
    if others:
        raise StoreError(f"{root} exists and is not empty; choose a new folder for the store")


def make_folder(root: Path) -> None:
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
