"""The index's files on disk in either layout: one ``index.faiss``, or N shard files.

A sharded index (``medsearch reindex --shards N``) is N FAISS indexes cut from one trained
index (retrieval.ann.policy.split_trained), shard i holding the ids with id % N == i, kept in
``index.faiss.0`` … ``index.faiss.{N-1}`` (FAISS cannot serialise an IndexShards as one file).
Each shard file is written like the single file (unique temp file, verified, fsynced) and has
its own record in the manifest; the manifest is written once every shard file is verified, so
it is the commit point of a save: a kill before it leaves the previous layout and its files in
use, a kill after it (before every file is renamed into place) leaves files that fail their
new records, and the index is rebuilt from the stored vectors in the new layout.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from .. import ann
from .indexfile import read_checked, read_index_file
from .layout import CHUNK, INDEX_FILE, MANIFEST, AtomicFile, Manifest, write_error

_SHARD_NAME = re.compile(re.escape(INDEX_FILE) + r"\.(\d+)$")


def shard_path(root: Path, number: int) -> Path:
    return root / f"{INDEX_FILE}.{number}"


def index_paths(root: Path, manifest: Manifest) -> list[Path]:
    """The files the manifest's layout names: [index.faiss] or index.faiss.0 … N-1."""
    if manifest.index_shards > 1:
        return [shard_path(root, i) for i in range(manifest.index_shards)]
    return [root / INDEX_FILE]


def describe(root: Path, manifest: Manifest) -> str:
    """The index file(s) in a message: "index file X" or "index files X.0 … X.{N-1}"."""
    paths = index_paths(root, manifest)
    if len(paths) == 1:
        return f"index file {paths[0]}"
    return f"index files {paths[0]} … {paths[-1].name}"


def recorded(manifest: Manifest) -> bool:
    """Whether the manifest records checksums for its index file(s)."""
    if manifest.index_shards > 1:
        return bool(manifest.index_shard_files)
    return manifest.index_size is not None


def read_index_files(root: Path, manifest: Manifest, *, full: bool = False
                     ) -> tuple[faiss.Index | None, str | None, dict[str, np.ndarray]]:
    """The saved index in the manifest's layout, every file checked against its record:
    (index, None, saved states), (None, None, {}) when never saved, or (None, why, {}) naming
    the bad shard. Saved states (indexfile.saved_states) of shards count only where every
    shard file was saved from the same rows (a kill mid-renames mixes two saves)."""
    if manifest.index_shards <= 1:
        return read_index_file(root / INDEX_FILE, manifest, full=full)
    records = manifest.index_shard_files or []
    if not records:
        return None, None, {}  # never saved in this layout (a backup's copy builds it from rows)
    if len(records) != manifest.index_shards:
        return None, (f"the manifest records {len(records)} shard file(s) for "
                      f"{manifest.index_shards} shards"), {}
    parts, states = [], []
    for number, record in enumerate(records):
        path = shard_path(root, number)
        vouched = [r for r in (record, record.get("previous")) if r]
        index, problem, saved = read_checked(path, vouched, full=full)
        if index is None:
            return None, f"shard {path.name}: {problem or 'the file is missing'}", {}
        parts.append(ann.enable_lookup(index))
        states.append(saved)
    kinds = {type(ann.inner_index(part)).__name__ for part in parts}
    if len(kinds) > 1:  # a kill mid-rename of a re-typed save: old and new files side by side
        return None, f"its shards hold different index types ({', '.join(sorted(kinds))})", {}
    common = set.intersection(*(set(saved) for saved in states))
    return ann.sharded(parts), None, {token: np.concatenate([saved[token] for saved in states])
                                      for token in common}


def write_shard_files(index: faiss.Index, root: Path, manifest: Manifest, high_water: int,
                      token: str | None = None, hidden: np.ndarray | None = None) -> int:
    """Save a sharded index: every shard to its own verified temp file, then the manifest
    (new records; each keeps its file's previous record when the layout is unchanged), then
    the renames. Returns the id high-water mark the manifest now records. On any error the
    temp files are removed, the in-memory manifest restored, and the old files stay.
    ``token``/``hidden``: the rows' token the index matches and the removed ids it holds,
    recorded per shard (see indexfile)."""
    parts = ann.shard_list(index)
    before = asdict(manifest)
    outs: list[AtomicFile] = []
    path = root / MANIFEST
    try:
        for number, part in enumerate(parts):
            path = shard_path(root, number)
            outs.append(AtomicFile(path))
            faiss.write_index(part, faiss.PyCallbackIOWriter(outs[-1].write, CHUNK))
            outs[-1].finish(verify=True)
        m = manifest
        same_layout = m.index_shards == len(parts) and len(m.index_shard_files or []) == len(parts)
        old = m.index_shard_files if same_layout else [None] * len(parts)
        hidden = np.zeros(0, np.int64) if hidden is None else hidden
        where = ann.shard_of(hidden, len(parts))
        m.index_shard_files = [
            {"size": out.size, "count": int(part.ntotal), "crc32": out.crc,
             "sha256": out.sha.hexdigest(), "token": token,
             "hidden": hidden[where == number].tolist() if token else None,
             "previous": {k: v for k, v in prev.items() if k != "previous"} if prev else None}
            for number, (out, part, prev) in enumerate(zip(outs, parts, old))]
        m.index_shards = len(parts)
        m.index_size = m.index_count = m.index_crc32 = m.index_sha256 = None
        m.index_previous = None
        ids = [_max_id(part) for part in parts]
        m.id_high_water = int(max([high_water, *ids]))
        path = root / MANIFEST
        m.write(path)
        for out in outs:
            path = out.path
            out.replace()
    except OSError as exc:
        _abort(outs, manifest, before)
        raise write_error(path, exc) from None
    except BaseException:
        _abort(outs, manifest, before)
        raise
    remove_stale_files(root, len(parts))
    return manifest.id_high_water


def _max_id(part: faiss.Index) -> int:
    ids = faiss.vector_to_array(faiss.downcast_index(part).id_map)
    return int(ids.max()) if ids.size else 0


def _abort(outs: list[AtomicFile], manifest: Manifest, before: dict) -> None:
    for out in outs:
        out.abort()
    manifest.__dict__.update(before)


def remove_stale_files(root: Path, shards: int) -> None:
    """Index files of an earlier layout, once the manifest no longer names them: the single
    file after sharding, shard files beyond N (or all of them after going back to one)."""
    stale = [root / INDEX_FILE] if shards > 1 else []
    for entry in root.iterdir():
        found = _SHARD_NAME.match(entry.name)
        if found and (shards <= 1 or int(found.group(1)) >= shards):
            stale.append(entry)
    for path in stale:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # a leftover is harmless: no manifest vouches for it


def shard_sizes(index: faiss.Index) -> list[int]:
    """Vectors held per shard (hidden removed ones included)."""
    return [int(part.ntotal) for part in ann.shard_list(index)]
