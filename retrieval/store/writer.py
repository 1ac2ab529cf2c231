"""One write transaction of a store: sources with their images, vectors and labels; failures.

Files are written with a few set-based statements per batch rather than ORM objects: the ORM's
per-object flushes cost ~4 ms a file, which capped a GPU indexing run near 200 files/s in the
main process. The FAISS index follows the rows only after the transaction commits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from ..errors import StoreError
from . import blobs as vector_blobs
from .database import zero_freed_pages
from .rows import IMAGE_COLUMNS, chunks
from .schema import FailureRow, FileRow, ImageRow, LabelRow, SettingRow, VectorRow

if TYPE_CHECKING:
    from . import Store


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


class StoreWriter:
    """One transaction's worth of changes (from :meth:`Store.writer`); the FAISS index
    follows only after commit."""

    def __init__(self, store: "Store", session: Session) -> None:
        self.store, self.session = store, session
        self.added: list[tuple[int, np.ndarray]] = []
        self.removed: list[int] = []

    def remove_files(self, paths: list[str]) -> int:
        """Delete sources and their images (vectors and labels cascade); returns images removed."""
        self.session.flush()  # pending ORM changes (touch/rename) first
        file_ids: list[int] = []
        for chunk in chunks(list(paths)):
            file_ids += self.session.scalars(select(FileRow.id).where(FileRow.path.in_(chunk))).all()
        if not file_ids:
            return 0
        image_ids: list[int] = []
        for chunk in chunks(file_ids):
            image_ids += self.session.scalars(
                select(ImageRow.id).where(ImageRow.file_id.in_(chunk))).all()
            # ON DELETE CASCADE (foreign_keys=ON) removes images, vectors and labels
            self.session.execute(delete(FileRow).where(FileRow.id.in_(chunk))
                                 .execution_options(synchronize_session=False))
        self.session.expire_all()  # no stale ORM objects for the deleted rows
        self.removed.extend(image_ids)
        return len(image_ids)

    def forget_in_cohorts(self, image_ids: list[int]) -> int:
        """Purge ``image_ids`` from every saved cohort, in this transaction; returns the
        memberships removed."""
        from .cohort_rows import purge_members

        return purge_members(self.session, image_ids)

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
        # float16 on disk; the index gets the values a reader gets back, so an index fed
        # here equals one rebuilt from the rows
        blobs = vector_blobs.encode(np.stack(vectors)) if vectors else []
        vectors = list(vector_blobs.decode(blobs, dim))
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
                {"image_id": i, "vector": b} for i, b in zip(image_ids, blobs)])
        labels = [{"image_id": i, "label": label, "source": "user", "score": None}
                  for i, image in zip(image_ids, (im for f in files for im in f.images))
                  for label in image.labels]
        if labels:
            self.session.execute(insert(LabelRow), labels)
        for chunk in chunks(paths):
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

    def failure_paths(self) -> list[str]:
        """Paths of every source recorded as failed or skipped."""
        return list(self.session.scalars(select(FailureRow.path)))

    # -- labels and settings --------------------------------------------------------------------
    def vector_ids(self) -> np.ndarray:
        """Ids of every stored vector, ascending, as this transaction sees them."""
        return np.fromiter(self.session.scalars(select(VectorRow.image_id)
                                                .order_by(VectorRow.image_id)), dtype=np.int64)

    def remove_labels(self, source: str) -> int:
        """Delete every label written by ``source``; returns how many."""
        return self.session.execute(delete(LabelRow).where(LabelRow.source == source)).rowcount

    def add_labels(self, labels: list[tuple[int, str, float | None]], source: str) -> None:
        """(image id, label, score) rows of one source (score None: given by a person)."""
        if labels:
            self.session.execute(insert(LabelRow), [
                {"image_id": int(i), "label": label, "score": score, "source": source}
                for i, label, score in labels])

    def set_setting(self, key: str, value: str) -> None:
        self.session.merge(SettingRow(key=key, value=value))

    def zero_freed_pages(self) -> None:
        """SQLite's secure_delete for this transaction: what it deletes is overwritten
        (PostgreSQL leaves dead row versions until VACUUM: :meth:`Store.checkpoint`)."""
        zero_freed_pages(self.session)
