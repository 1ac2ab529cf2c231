"""Which database a store folder's rows are in, its writer lock, and folders that share one.

A PostgreSQL store is one database and any number of folders, one per server (or machine),
each holding a manifest and the FAISS index: a derived cache caught up from the database at
open. The database records the manifest it was created with, so a new folder pointed at it
(``--store NEW --db URL``) adopts the store instead of starting another one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from sqlalchemy import create_engine, inspect, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from ..errors import StoreError
from .database import (MANIFEST_SETTING, WriterLock, check_url, connect_error, database_has_rows,
                       is_postgres, public_url)
from .layout import (DATABASE, DIR_MODE, FORMAT_VERSION, MANIFEST, Manifest, acquire_lock,
                     atomic_write_bytes, check_new_store_folder, make_folder, remove_stale_temps)
from .schema import SCHEMA_VERSION, SettingRow

#: Manifest fields that describe one folder's index file, not the store.
INDEX_RECORD = ("index_size", "index_count", "index_crc32", "index_sha256", "index_previous")


def recorded_manifest(url: str) -> dict | None:
    """The manifest a PostgreSQL store was created with (None: the database holds no store)."""
    engine = create_engine(url, poolclass=NullPool, hide_parameters=True)  # one short look
    try:
        with engine.connect() as conn:
            if "settings" not in inspect(conn).get_table_names():
                return None
            value = conn.scalar(select(SettingRow.value).where(SettingRow.key == MANIFEST_SETTING))
    except SQLAlchemyError as exc:
        raise connect_error(url, exc) from None
    finally:
        engine.dispose()
    return json.loads(value) if value else None


def record_manifest(rows, manifest: Manifest) -> None:
    """Keep the creating manifest in the database (``rows``: the store's Rows)."""
    record = {k: v for k, v in asdict(manifest).items() if k not in INDEX_RECORD}
    rows.set_setting(MANIFEST_SETTING, json.dumps(record))


def adopt(root: Path, url: str) -> bool:
    """Make ``root`` (new or empty of a store) a folder of the store in ``url``; False when
    the database holds no store."""
    record = recorded_manifest(check_url(url))
    if record is None:
        return False
    make_folder(root)
    fd = acquire_lock(root, wait=True)  # two servers adopting one folder write it once
    try:
        if not (root / MANIFEST).is_file():
            manifest = Manifest(**{**record, **dict.fromkeys(INDEX_RECORD), "database":
                                   public_url(url)})
            atomic_write_bytes(root / MANIFEST, json.dumps(asdict(manifest), indent=2).encode())
    finally:
        os.close(fd)
    return True


def database_url(root: Path, manifest: Manifest, db: str | None) -> str | None:
    """The database to open for the store in ``root``: ``db`` (the setting) or the one its
    manifest records; None: SQLite in the folder. A URL that names another store is refused."""
    if db is None:
        return manifest.database
    check_url(db)
    if manifest.database is None:
        raise StoreError(f"store {root} keeps its rows in SQLite in its folder; the db setting "
                         f"({public_url(db)}) names a PostgreSQL database. Leave db unset for "
                         "this store, or index into a new folder with it", setting="db")
    if public_url(db) != manifest.database:  # another name for the same server, or not?
        record = recorded_manifest(db)
        if record is None or record.get("created_at") != manifest.created_at:
            raise StoreError(f"the database {public_url(db)} does not hold the store in {root} "
                             f"(made over {manifest.database}); use that database or a new "
                             "folder", setting="db")
    return db


def lock_store(root: Path, url: str | None, *, fd: int | None = None) -> WriterLock:
    """The writer lock: the folder's file lock, plus the database's advisory lock for a
    PostgreSQL store (``fd``: a file lock already held, kept on failure)."""
    lock = WriterLock(acquire_lock(root) if fd is None else fd)
    if is_postgres(url):
        try:
            lock.ensure_advisory(url)
        except BaseException:
            if fd is None:
                lock.release()
            raise
    return lock


def prepare_new(root: Path, manifest: Manifest, lock: WriterLock, db: str | None) -> None:
    """Checks before a store is created in ``root`` (under ``lock``): the folder is new, and
    the database (a PostgreSQL ``db``) holds no store yet; records ``db`` in the manifest."""
    check_new_store_folder(root)
    if db is None and (root / DATABASE).exists() and database_has_rows(root / DATABASE):
        raise StoreError(f"{root} holds a {DATABASE} with indexed files but no {MANIFEST}; "
                         "restore the manifest or choose a new folder for the store")
    if db is not None:
        manifest.database = public_url(check_url(db))
        lock.ensure_advisory(db)
        if recorded_manifest(db) is not None:  # open_or_create adopts it; create refuses
            raise StoreError(f"the database {manifest.database} already holds a store; open "
                             "it from a new folder instead", setting="db")
    remove_stale_temps(root)
    os.chmod(root, DIR_MODE)


def read_manifest(root: Path) -> Manifest:
    """The folder's manifest, refused when a newer medsearch wrote the store."""
    manifest = Manifest.read(root / MANIFEST)
    if manifest.format_version > FORMAT_VERSION or manifest.schema_version > SCHEMA_VERSION:
        raise StoreError(f"store {root} was written by a newer medsearch (format "
                         f"{manifest.format_version}, schema {manifest.schema_version}); "
                         "upgrade medsearch to open it")
    return manifest
