"""A store's integrity: check rows, vectors and the index file; repair what is derived; back up.

Only derived things are repaired (the index file and the manifest's record of it, the id
high-water mark, owner-only modes); vectors that are missing or of the wrong size can only be
re-embedded, so `check` lists their sources and `repair --drop` removes them for re-indexing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import StoreError
from .layout import (DATABASE, DIR_MODE, FILE_MODE, INDEX_FILE, MANIFEST, Manifest,
                     atomic_write_bytes, create_private_file, make_folder, temp_name, write_error)
from .database import copy_database
from .shards import describe, read_index_files, recorded
from .indexfile import read_index_file
from .vectors import index_ids, max_id, supports_removal

if TYPE_CHECKING:
    from . import Store


def check(store: "Store") -> dict:
    """Rows against vectors against the index file on disk, and the file's checksums.

    Returns {ok, problems, reembed, counts}: ``problems`` say what is wrong and what to run;
    ``reembed`` lists the sources whose vectors are missing or of the wrong size (only
    re-embedding can fix those: `medsearch repair --drop` then `medsearch index`)."""
    problems: list[str] = []
    found = store.db.integrity()
    quick, counts, good = found["quick_check"], found["counts"], found["good"]
    broken, orphans, db_max = found["broken"], found["orphans"], found["db_max_id"]
    if quick != ["ok"]:
        problems.append(f"database {store.db.describe()} is damaged ({'; '.join(quick[:3])}); "
                        "restore it from a backup (`medsearch backup`)")
    counts["vectors_ok"] = int(good.size)
    reembed = sorted({path for _, path in broken})
    if broken:
        problems.append(f"{len(broken)} image(s) in {len(reembed)} file(s) have no vector of "
                        f"{store.dim} values; they must be re-embedded: run `medsearch "
                        "repair --drop` and then `medsearch index` on them")
    if orphans:
        problems.append(f"{orphans} vector(s) belong to no image; run `medsearch repair`")
    path = describe(store.root, store.manifest)  # "index file X" or "index files X.0 … X.N"
    index, problem, _ = read_index_files(store.root, store.manifest, full=True)
    counts["index"] = None if index is None else int(index.ntotal)
    if problem:
        problems.append(f"{path}: {problem}; run `medsearch repair` to rebuild it")
    elif index is None and good.size:
        problems.append(f"{path} is missing; run `medsearch repair` to build it")
    elif index is not None:
        ids = np.sort(index_ids(index))
        stale = np.setdiff1d(ids, good, assume_unique=True)
        lacking = np.setdiff1d(good, ids, assume_unique=True)
        if supports_removal(index) and stale.size:
            problems.append(f"{path} holds {stale.size} id(s) with no row "
                            f"(e.g. {stale[:5].tolist()}); run `medsearch repair`")
        if lacking.size:
            problems.append(f"{path} lacks {lacking.size} stored vector(s) "
                            f"(e.g. {lacking[:5].tolist()}); run `medsearch repair`")
        if not recorded(store.manifest):
            problems.append(f"the manifest records no checksum for {path}; run "
                            "`medsearch repair` to record one")
        top = max(max_id(index), db_max)
        if store.manifest.id_high_water < max_id(index):
            problems.append(f"the manifest's id high-water mark {store.manifest.id_high_water} "
                            f"is below the index's ids (up to {top}); run `medsearch repair`")
    return {"ok": not problems, "store": str(store.root), "problems": problems,
            "reembed": reembed, "counts": counts}


def repair(store: "Store", *, drop: bool = False) -> dict:
    """Rebuild what is derived: the index file and the manifest's record of it, the id
    high-water mark, owner-only modes. ``drop``: delete the sources that must be
    re-embedded, so the next `medsearch index` embeds them again. Needs the writer lock."""
    if store.readonly:
        raise StoreError(f"store {store.root} was opened read-only")
    with store.exclusive():
        before = check(store)
        dropped: list[str] = []
        if drop and before["reembed"]:
            with store.writer() as w:
                w.remove_files(before["reembed"])
            dropped = before["reembed"]
        with store.db.transaction() as session:
            store._guard_ids(session)
        store.rebuild(store.manifest.index_type)
        store.save()
        os.chmod(store.root, DIR_MODE)
        for entry in store.root.iterdir():
            if entry.is_file() and entry.stat().st_uid == os.getuid():
                os.chmod(entry, FILE_MODE)
        after = check(store)
    return {"ok": after["ok"], "store": str(store.root), "fixed": before["problems"],
            "problems": after["problems"], "dropped": dropped,
            "reembed": after["reembed"], "counts": after["counts"]}


def backup(root: str | Path, dest: str | Path) -> dict:
    """A consistent copy of a store that may be in use, into a new (or empty) folder.

    The database is copied with SQLite's online backup API (one snapshot, writers go on);
    the index file and manifest are copied as a pair (the manifest read before and after the
    copy must agree and vouch for the copied file's checksum, else the copy goes without an
    index). The copy is then opened under its own lock, reconciled with its database and
    saved, so its index, manifest and rows are of the same moment; returns its `check`."""
    import sqlite3

    from . import Store

    root, dest = Path(root), Path(dest)
    if not (root / MANIFEST).is_file():
        raise StoreError(f"no store at {root} (no {MANIFEST})")
    database = Manifest.read(root / MANIFEST).database
    if database is not None:  # the folder holds only a cache: the rows are in the database
        raise StoreError(f"store {root} keeps its rows in the PostgreSQL database {database}; "
                         "back that up with PostgreSQL's tools (pg_dump, or a base backup "
                         "with WAL archiving). The store folder holds only a cache of it "
                         "(manifest and FAISS index) that `medsearch repair` rebuilds")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StoreError(f"{dest} exists and is not empty; back up into a new folder")
    make_folder(dest)
    os.chmod(dest, DIR_MODE)
    create_private_file(dest / DATABASE)
    try:
        copy_database(root / DATABASE, dest / DATABASE)
    except sqlite3.Error as exc:
        raise StoreError(f"could not copy {root / DATABASE} to {dest}: {exc}") from None
    except OSError as exc:
        raise write_error(dest / DATABASE, exc) from None
    manifest_bytes = None
    sharded = Manifest(**json.loads((root / MANIFEST).read_bytes())).index_shards > 1
    for _ in range(0 if sharded else 5):  # a sharded index is rebuilt in the copy, below
        first = (root / MANIFEST).read_bytes()
        index_copy = temp_name(dest / INDEX_FILE)
        try:
            shutil.copyfile(root / INDEX_FILE, index_copy)
        except FileNotFoundError:
            index_copy.unlink(missing_ok=True)
        except OSError as exc:
            index_copy.unlink(missing_ok=True)
            raise write_error(dest / INDEX_FILE, exc) from None
        if (root / MANIFEST).read_bytes() != first:
            continue  # a save landed meanwhile: copy the pair again
        manifest = Manifest(**json.loads(first))
        if index_copy.exists():
            index, problem, _ = read_index_file(index_copy, manifest, full=True)
            if problem or index is None:
                index_copy.unlink()
                continue
            os.chmod(index_copy, FILE_MODE)
            os.replace(index_copy, dest / INDEX_FILE)
        manifest_bytes = first
        break
    if manifest_bytes is None:  # no agreeing pair: the copy builds its index from its rows
        manifest = Manifest(**json.loads((root / MANIFEST).read_bytes()))
        for name in ("index_size", "index_count", "index_crc32", "index_sha256", "index_previous",
                     "index_shard_files"):
            setattr(manifest, name, None)
        (dest / INDEX_FILE).unlink(missing_ok=True)
        manifest_bytes = json.dumps(asdict(manifest), indent=2).encode()
    atomic_write_bytes(dest / MANIFEST, manifest_bytes)
    copy = Store.open(dest, exclusive=True)
    try:
        copy.vector_index.dirty = True  # record the copy's own index (its rows may be newer)
        copy.save()
        report = check(copy)
    finally:
        copy.close()
    return {**report, "source": str(root), "backup": str(dest)}
