"""The store's rows through SQLAlchemy: the one place that opens sessions and connections.

The database (SQLite in the store folder, or PostgreSQL by URL: database.py holds what
differs) is the store's source of truth. Reads that must agree with each other (the ids and
vectors a reconcile adds, an integrity check) run in one snapshot: a reader sees a whole
committed batch or none of it, and writers go on meanwhile.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from sqlalchemy import RowMapping, Text, delete, func, or_, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ..errors import StoreError
from . import blobs as vector_blobs
from . import database
from .database import is_postgres, snapshot
from .schema import DICOM_FIELDS, FailureRow, FileRow, ImageRow, LabelRow, SettingRow, VectorRow

if TYPE_CHECKING:
    from ..filters import Filters

#: Metadata keys an image row stores (anything else a decoder reports is not kept).
IMAGE_COLUMNS = frozenset(DICOM_FIELDS) | {"patient_key"}
#: SQLite caps bound parameters per statement; IN lists go in chunks of this many.
IN_CHUNK = 900


def chunks(values: list, size: int = IN_CHUNK):
    for start in range(0, len(values), size):
        yield values[start:start + size]


#: all_vectors converts this many float16 rows at a time (the float32 copy is the only big one).
READ_BLOCK = 16_384


def image_dict(row: RowMapping, labels: list[dict]) -> dict:
    """A result row (images joined with its file's path and kind) as the dict results carry."""
    meta = {c: row[c] for c in ("width", "height", *DICOM_FIELDS, "patient_key")}
    meta = {k: v for k, v in meta.items() if v is not None}
    meta["source_kind"] = row["source_kind"]
    meta["labels"] = labels
    return {"id": row["id"], "path": row["path"], "frame": row["frame"], "metadata": meta}


class Rows:
    """The store's database: engine, sessions and every query the rest of medsearch needs."""

    def __init__(self, location: Path | str, dim: int, *, readonly: bool) -> None:
        """``location``: the SQLite file, or a PostgreSQL URL."""
        self.location, self.dim, self.readonly = location, dim, readonly
        self.postgres = is_postgres(str(location))
        self.engine = database.make_engine(location)
        try:
            self._migrate()
        except OperationalError as exc:
            self.engine.dispose()
            if not self.postgres:
                raise
            raise database.connect_error(str(location), exc) from None
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _migrate(self) -> None:
        """Create or upgrade the schema with Alembic; a read-only open never writes it."""
        from .revision import HEAD, READABLE_WITHOUT_TOKEN, stored_revision

        stored = stored_revision(self.engine)
        #: Whether the schema has the vectors token (read-only, an older one is read as it is).
        self.has_token = not (self.readonly and stored in READABLE_WITHOUT_TOKEN)
        if stored == HEAD or not self.has_token:  # up to date: Alembic is not even imported
            return
        from . import migrations

        if self.readonly and migrations.current(self.engine) == migrations.head():
            return
        if self.readonly and (self.postgres or Path(self.location).stat().st_size > 0):
            raise StoreError(f"store {self.describe()} needs a schema upgrade; run any writing "
                             "command on it first (e.g. `medsearch index` or `medsearch reindex`)")
        migrations.upgrade(self.engine, dim=self.dim)

    def describe(self) -> str:
        """The database as messages name it (a PostgreSQL URL without its password)."""
        return database.public_url(str(self.location)) if self.postgres else str(self.location)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back on an error."""
        with self.sessions() as session, session.begin():
            yield session
            database.bump_commits(session)  # in the same transaction: readers see it with the rows

    def vectors_token(self, conn=None) -> str | None:
        """The vectors' token (database.vectors_token) now, or in ``conn``'s snapshot."""
        if conn is None:
            with self.engine.connect() as conn:
                return self.vectors_token(conn)
        return database.vectors_token(conn) if self.has_token else None

    def dispose(self) -> None:
        self.engine.dispose()

    def checkpoint(self, table: str | None = None) -> None:
        """Drop old copies of deleted rows (SQLite: empty the WAL; PostgreSQL: VACUUM, and
        rewrite ``table``)."""
        database.compact_table(self.engine, table)

    # -- ids -------------------------------------------------------------------------------------
    def db_max_id(self) -> int:
        """The highest image id the database has handed out (its id counter)."""
        with self.engine.connect() as conn:
            seq = database.max_handed_out_id(conn)
            top = conn.scalar(select(func.max(ImageRow.id)))
        return max(int(seq or 0), int(top or 0))

    @staticmethod
    def guard_ids(session: Session, high_water: int) -> None:
        """Make the database hand out only image ids above ``high_water`` (raise its counter).

        images.id is AUTOINCREMENT, but its counter lives in the same database: when the last
        commit is lost (power cut under synchronous=NORMAL) or an older copy of the database is
        restored, the counter goes back while the saved FAISS file still holds the lost ids,
        and a new image taking such an id would be found by the lost image's vector. Raising
        sqlite_sequence to the store's high-water mark (the manifest's ``id_high_water``, saved
        with each index, and the ids in the index file as loaded) makes SQLite hand out only
        fresh ids."""
        if int(high_water) > 0:
            database.raise_id_counter(session, int(high_water))

    def whole_vector(self, table):
        """Vectors of this store's size, float16 or not yet migrated float32 (a wrong-sized
        blob is never indexed: `repair` lists it)."""
        return func.length(table.c.vector).in_(vector_blobs.valid_sizes(self.dim))

    def diff(self, index_ids: np.ndarray, *, read_missing: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str | None]:
        """(ids the index holds without a row, row ids it lacks, their vectors if
        ``read_missing``, the vectors' token), all read in one snapshot."""
        table = VectorRow.__table__
        with snapshot(self.engine) as conn:  # one snapshot for every read; writers go on
            token = self.vectors_token(conn)
            db_ids = np.fromiter(conn.scalars(select(table.c.image_id)
                                              .where(self.whole_vector(table))), dtype=np.int64)
            extra = np.setdiff1d(index_ids, db_ids, assume_unique=True)
            missing = np.setdiff1d(db_ids, index_ids, assume_unique=True)
            vectors = self._read_vectors(conn, missing) if missing.size and read_missing else None
        return extra, missing, vectors, token

    # -- vectors ---------------------------------------------------------------------------------
    def vectors(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Raw vectors for ``ids``, in that order (missing ids raise)."""
        with self.engine.connect() as conn:  # Core rows: the ORM's per-row work is not needed
            return self._read_vectors(conn, ids)

    def _read_vectors(self, conn, ids: np.ndarray | list[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        found: dict[int, bytes] = {}
        table = VectorRow.__table__
        for chunk in chunks(ids):
            rows = conn.execute(select(table.c.image_id, table.c.vector)
                                .where(table.c.image_id.in_(chunk), self.whole_vector(table)))
            found.update((image_id, blob) for image_id, blob in rows.all())
        missing = [i for i in ids if i not in found]
        if missing:
            raise StoreError(f"no stored vector for id(s) {missing[:10]}")
        return vector_blobs.decode([found[i] for i in ids], self.dim)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray, str | None]:
        """Every (id, float32 vector), ascending, and the vectors' token, in one snapshot; read
        in blocks kept as float16 until the float32 result is filled (peak ~1.5× the result,
        not 2× as with float32 blobs)."""
        table = VectorRow.__table__
        ids: list[np.ndarray] = []
        parts: list[np.ndarray] = []
        with snapshot(self.engine) as conn:
            token = self.vectors_token(conn)
            result = conn.execution_options(stream_results=True, yield_per=READ_BLOCK).execute(
                select(table.c.image_id, table.c.vector).where(self.whole_vector(table))
                .order_by(table.c.image_id))
            for block in result.partitions(READ_BLOCK):
                ids.append(np.fromiter((r[0] for r in block), dtype=np.int64, count=len(block)))
                parts.append(vector_blobs.decode_compact([r[1] for r in block], self.dim))
        out = np.empty((sum(len(p) for p in parts), self.dim), np.float32)
        at = 0
        for part in parts:  # float16 blocks widened into place: no second full-size copy
            out[at:at + len(part)] = part
            at += len(part)
        return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), out, token

    def vector_ids(self) -> np.ndarray:
        """Ids of every stored vector, ascending."""
        with self.engine.connect() as conn:
            return np.fromiter(conn.scalars(select(VectorRow.image_id)
                                            .order_by(VectorRow.image_id)), dtype=np.int64)

    def vectors_for_paths(self, paths: list[str]) -> dict[str, np.ndarray]:
        """path → the stored vector of its middle frame, for the paths that are indexed."""
        frames: dict[str, list[tuple[int, int]]] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(list(paths)):
                for path, image_id, frame in conn.execute(
                        select(FileRow.path, ImageRow.id, ImageRow.frame)
                        .join(ImageRow, ImageRow.file_id == FileRow.id)
                        .where(FileRow.path.in_(chunk))):
                    frames.setdefault(path, []).append((frame, image_id))
        chosen = {path: sorted(rows)[len(rows) // 2][1] for path, rows in frames.items()}
        if not chosen:
            return {}
        vectors = self.vectors(list(chosen.values()))
        return {path: vectors[i] for i, path in enumerate(chosen)}

    # -- rows --------------------------------------------------------------------------------------
    def matching_ids(self, filters: "Filters") -> np.ndarray:
        """Sorted ids of the rows the filters admit.

        The database joins them into one string: a Python row per id cost several times the
        query itself (10k ids: ~9 ms through SQLAlchemy rows, ~3 ms this way)."""
        selected = filters.query().subquery()
        joined_ids = (func.string_agg(selected.c.id.cast(Text), ",") if self.postgres
                      else func.group_concat(selected.c.id))
        with self.engine.connect() as conn:
            joined = conn.execute(select(joined_ids)).scalar()
        if not joined:
            return np.zeros(0, np.int64)
        return np.sort(np.fromstring(joined, dtype=np.int64, sep=","))

    def rows(self, ids: list[int]) -> dict[int, dict]:
        """Metadata of images by id, as plain dicts (path and frame included)."""
        if not ids:
            return {}
        images, files, labels = ImageRow.__table__, FileRow.__table__, LabelRow.__table__
        out: dict[int, dict] = {}
        with self.engine.connect() as conn:  # Core rows: a results page is on every query's path
            for chunk in chunks(list(ids)):
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

    def ids_for_path(self, path: str) -> set[int]:
        """Ids of the images stored for one source path."""
        with self.engine.connect() as conn:
            return set(conn.scalars(select(ImageRow.id)
                                    .join(FileRow, ImageRow.file_id == FileRow.id)
                                    .where(FileRow.path == path)))

    def image_keys(self) -> list[tuple[int, str, int, str]]:
        """(id, path, frame, content hash) of every stored image."""
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                select(ImageRow.id, FileRow.path, ImageRow.frame, FileRow.content_hash)
                .join(FileRow, FileRow.id == ImageRow.file_id))]

    def stats(self) -> dict:
        with self.sessions() as session:
            files = session.scalar(select(func.count()).select_from(FileRow))
            rows = session.scalar(select(func.count()).select_from(ImageRow))
            failures = session.scalar(select(func.count()).select_from(FailureRow))
            modalities = dict(session.execute(
                select(ImageRow.modality, func.count()).group_by(ImageRow.modality)).all())
        return {"files": files, "images": rows, "failures": failures,
                "modalities": {str(k): v for k, v in modalities.items()}}

    def known_files(self, roots: list[str]) -> dict[str, tuple[int, int, str]]:
        """path → (size, mtime_ns, content_hash) of stored sources under any of ``roots``."""
        clauses = []
        for root in roots:
            prefix = root.rstrip(os.sep) + os.sep
            clauses += [FileRow.path == root, func.substr(FileRow.path, 1, len(prefix)) == prefix]
        with self.sessions() as session:
            rows = session.execute(select(FileRow.path, FileRow.size, FileRow.mtime_ns,
                                          FileRow.content_hash).where(or_(*clauses))).all()
        return {path: (size, mtime, digest) for path, size, mtime, digest in rows}

    def failures(self) -> dict[str, str]:
        """path → reason of every source recorded as failed or skipped."""
        with self.engine.connect() as conn:
            return dict(conn.execute(select(FailureRow.path, FailureRow.reason)).all())

    def labels(self, source: str) -> list[tuple[str, int, str, float | None]]:
        """(path, frame, label, score) of every label written by ``source``."""
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(
                select(FileRow.path, ImageRow.frame, LabelRow.label, LabelRow.score)
                .join(ImageRow, ImageRow.id == LabelRow.image_id)
                .join(FileRow, FileRow.id == ImageRow.file_id)
                .where(LabelRow.source == source))]

    # -- settings ----------------------------------------------------------------------------------
    def setting(self, key: str, default: str | None = None) -> str | None:
        with self.sessions() as session:
            row = session.get(SettingRow, key)
            return row.value if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self.transaction() as session:
            session.merge(SettingRow(key=key, value=value))

    def setting_keys(self, prefix: str) -> set[str]:
        with self.sessions() as session:
            return set(session.scalars(select(SettingRow.key)
                                       .where(SettingRow.key.startswith(prefix))))

    def delete_setting_securely(self, key: str) -> None:
        """Delete a setting with its old copies gone: SQLite's secure_delete (freed pages
        zeroed) then an emptied WAL; PostgreSQL rewrites the settings table."""
        with self.transaction() as session:
            database.zero_freed_pages(session)
            session.execute(delete(SettingRow).where(SettingRow.key == key))
        self.checkpoint("settings")

    # -- series and patients -------------------------------------------------------------------
    def series_images(self, series_uids: list[str], *, exclude_kind: str) -> list[dict]:
        """Image rows (id, width, height and metadata columns) of these series, sources of
        ``exclude_kind`` (the series vectors themselves) left out."""
        images = ImageRow.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(select(images).join(FileRow, FileRow.id == images.c.file_id)
                                .where(images.c.series_uid.in_(list(series_uids)),
                                       FileRow.source_kind != exclude_kind))
            return [dict(row) for row in rows.mappings()]

    def series_counts(self, kind: str) -> tuple[dict[str, int], dict[str, int]]:
        """(series uid → member count recorded by its ``kind`` row, series uid → images now
        stored in it outside ``kind``)."""
        with self.engine.connect() as conn:
            recorded = dict(conn.execute(
                select(ImageRow.series_uid, FileRow.size).join(FileRow)
                .where(FileRow.source_kind == kind)).all())
            if not recorded:
                return {}, {}
            current = dict(conn.execute(
                select(ImageRow.series_uid, func.count()).join(FileRow)
                .where(FileRow.source_kind != kind, ImageRow.series_uid.in_(list(recorded)))
                .group_by(ImageRow.series_uid)).all())
        return recorded, current

    def sources_of(self, *, patient_keys: list[str] | None = None,
                   study_uid: str | None = None) -> tuple[list[tuple[str, str]], int]:
        """((path, source kind) of every source holding an image of these patient keys or of
        this study, labels on those sources' images)."""
        match = (ImageRow.patient_key.in_(patient_keys) if patient_keys is not None
                 else ImageRow.study_uid == study_uid)
        file_ids = select(ImageRow.file_id).where(match).scalar_subquery()  # whole files go
        with self.engine.connect() as conn:
            files = [tuple(r) for r in conn.execute(select(FileRow.path, FileRow.source_kind)
                                                    .where(FileRow.id.in_(file_ids)))]
            labels = conn.scalar(select(func.count()).select_from(LabelRow)
                                 .join(ImageRow, ImageRow.id == LabelRow.image_id)
                                 .where(ImageRow.file_id.in_(file_ids)))
        return files, int(labels or 0)

    # -- groups (one row per patient, study or series: retrieval.ranking) -------------------
    def group_keys(self, ids: list[int], column: str) -> dict[int, str | None]:
        """id → its ``column`` value (patient_key, study_uid or series_uid), None when unset."""
        col = ImageRow.__table__.c[column]
        out: dict[int, str | None] = {}
        with self.engine.connect() as conn:
            for chunk in chunks([int(i) for i in ids]):
                out.update(conn.execute(select(ImageRow.id, col).where(ImageRow.id.in_(chunk))).all())
        return out

    def group_members(self, column: str, keys: list[str]) -> dict[str, list[int]]:
        """key → ids of every stored image whose ``column`` holds that key."""
        col = ImageRow.__table__.c[column]
        out: dict[str, list[int]] = {}
        with self.engine.connect() as conn:
            for chunk in chunks(list(keys)):
                for image_id, key in conn.execute(select(ImageRow.id, col).where(col.in_(chunk))):
                    out.setdefault(key, []).append(int(image_id))
        return out

    def has_patient_keys(self) -> bool:
        """Whether any stored image carries a patient key (not so under the PHI policy drop)."""
        with self.engine.connect() as conn:
            return conn.scalar(select(ImageRow.id).where(ImageRow.patient_key.is_not(None))
                               .limit(1)) is not None

    # -- integrity ---------------------------------------------------------------------------------
    def integrity(self) -> dict:
        """One snapshot of what `check` compares: the database's own check, row counts, ids with a
        whole vector, (id, path) of images without one, orphan vectors, the id counter."""
        images, vectors, files = ImageRow.__table__, VectorRow.__table__, FileRow.__table__
        with snapshot(self.engine) as conn:
            quick = database.quick_check(conn)
            counts = {
                "files": conn.scalar(select(func.count()).select_from(files)),
                "images": conn.scalar(select(func.count()).select_from(images)),
                "vectors": conn.scalar(select(func.count()).select_from(vectors)),
            }
            good = np.fromiter(conn.scalars(select(vectors.c.image_id)
                                            .where(self.whole_vector(vectors))
                                            .order_by(vectors.c.image_id)), dtype=np.int64)
            broken = conn.execute(
                select(images.c.id, files.c.path)
                .join(files, files.c.id == images.c.file_id)
                .outerjoin(vectors, vectors.c.image_id == images.c.id)
                .where((vectors.c.image_id.is_(None)) | ~self.whole_vector(vectors))).all()
            orphans = conn.scalar(select(func.count()).select_from(vectors).where(
                ~vectors.c.image_id.in_(select(images.c.id))))
            db_max = max(database.max_handed_out_id(conn), int(conn.scalar(
                select(func.max(images.c.id))) or 0))
        return {"quick_check": quick, "counts": counts, "good": good,
                "broken": [tuple(r) for r in broken], "orphans": int(orphans or 0),
                "db_max_id": db_max}
