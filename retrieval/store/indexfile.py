"""One FAISS index file checked against the manifest's record(s) of it while it is read.

A record is {size, count, crc32, sha256, token, hidden} as written by the save that produced
the file: ``token`` is the vectors' token of the rows the file was saved from (None: not
known to match any) and ``hidden`` the removed ids the file still holds (a graph index cannot
drop them), so an open whose rows still have that token can use the file without comparing
every id. The single-file layout keeps its records in the manifest's ``index_*`` fields, a
sharded layout one record per shard file (retrieval/store/shards.py). Nothing here writes.
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import faiss
import numpy as np

from .layout import CHUNK, Manifest


def index_records(manifest: Manifest) -> list[dict]:
    """The index files the manifest vouches for: the last saved, and the one before it (a
    kill between the manifest's write and the file's rename leaves the older file in place)."""
    m = manifest
    records = []
    if m.index_size is not None:
        records.append({"size": m.index_size, "count": m.index_count, "crc32": m.index_crc32,
                        "sha256": m.index_sha256, "token": m.index_token,
                        "hidden": m.index_hidden})
    if m.index_previous:
        records.append(m.index_previous)
    return records


def saved_states(records: list[dict]) -> dict[str, np.ndarray]:
    """token → hidden ids, of the records that name the rows they were saved from (a record
    whose ids do not read as integers names none: the open then compares every id)."""
    states = {}
    for record in records:
        if isinstance(record.get("token"), str):
            try:
                states[record["token"]] = np.asarray(record.get("hidden") or [], np.int64)
            except (TypeError, ValueError, OverflowError):
                continue
    return states


def read_index_file(path: Path, manifest: Manifest, *, full: bool = False
                    ) -> tuple[faiss.Index | None, str | None, dict[str, np.ndarray]]:
    """The single index file checked against the manifest: (index, None, saved states) or
    (None, why, {}) (see :func:`read_checked`)."""
    return read_checked(path, index_records(manifest), full=full)


def read_checked(path: Path, records: list[dict], *, full: bool = False
                 ) -> tuple[faiss.Index | None, str | None, dict[str, np.ndarray]]:
    """Load an index file and check it against ``records``: (index, None, saved states) or
    (None, why, {}); the saved states (:func:`saved_states`) are those of the records the
    file matched.

    The size is checked before reading, the crc32 (and with ``full`` the sha256) while the
    bytes stream through FAISS's reader (no second pass, no extra copy), and the id count
    after. No record (a manifest older than these fields) is checked for readability only."""
    if not path.is_file():
        if any(r.get("count") for r in records):
            return None, "the file is missing", {}
        return None, None, {}  # never saved: a new or empty store
    size = path.stat().st_size
    if records and size not in {r["size"] for r in records}:
        return None, (f"it is {size:,} bytes where the manifest records "
                      f"{records[0]['size']:,} (truncated or overwritten)"), {}
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
                index = faiss.read_index(faiss.PyCallbackIOReader(read, CHUNK))
            except RuntimeError as exc:
                return None, (f"it is not a readable FAISS index "
                              f"({str(exc).splitlines()[-1][-120:]})"), {}
            while read(CHUNK):  # trailing bytes count in the checksum too
                pass
    except OSError as exc:
        return None, f"it cannot be read ({exc.strerror or exc})", {}
    matching = [r for r in records if r["size"] == size]
    if matching:
        matching = [r for r in matching if r.get("crc32") is None or r["crc32"] == crc]
        if not matching:
            return None, "its checksum differs from the manifest's (damaged on disk)", {}
        if full:
            matching = [r for r in matching
                        if r.get("sha256") is None or r["sha256"] == sha.hexdigest()]
            if not matching:
                return None, "its sha256 differs from the manifest's (damaged on disk)", {}
        counted = [r for r in matching if r.get("count") is None or r["count"] == index.ntotal]
        if not counted:
            return None, (f"it holds {index.ntotal:,} ids where the manifest records "
                          f"{matching[0]['count']:,}"), {}
        matching = counted
    return index, None, saved_states(matching)
