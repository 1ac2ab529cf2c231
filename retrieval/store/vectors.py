"""The FAISS index's life: a new index, checked load, add, remove, rebuild, train, save.

SQLite is the source of truth; the index is a derived cache addressed by image id (an IDMap2
wrapper), written atomically with its size, checksums and id count in the manifest, and never
searched when those disagree (it is rebuilt from the stored vectors instead). It is one index,
or N shards cut from one trained index (ids split by id % N; files: retrieval/store/shards.py).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from .. import ann
from ..errors import StoreError
from .indexfile import index_records
from .layout import CHUNK, INDEX_FILE, MANIFEST, AtomicFile, Manifest, write_error
from .shards import read_index_files, remove_stale_files, shard_sizes, write_shard_files

#: A graph index hides removed ids until they exceed this many, or this share of it.
TOMBSTONE_MIN = 256
TOMBSTONE_FRACTION = 0.02
#: A save records the rows' token (see load) only while it hides at most this many ids (they
#: are listed in the manifest, ~7 bytes each); beyond it the next open compares every id with
#: the rows. The tombstone rule above rebuilds long before this below ~3M vectors.
HIDDEN_RECORDED_MAX = 65_536

log = logging.getLogger(__name__)


def new_index(index_type: str, dim: int) -> faiss.Index:
    """An empty index of a FAISS factory type, addressed by our row ids (IDMap2 wrapper)."""
    if index_type == ann.AUTO:
        index_type = ann.choose_index(0, dim).index_type
    try:
        base = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise StoreError(f"invalid FAISS index type {index_type!r}: "
                         f"{str(exc).splitlines()[-1]}") from None
    return faiss.IndexIDMap2(ann.configure(base))


def new_layout(index_type: str, dim: int, shards: int = 1) -> faiss.Index:
    """An empty index of ``index_type``, as ``shards`` shards when more than one."""
    index = new_index(index_type, dim)
    return ann.sharded(ann.split_trained(index, shards)) if shards > 1 else index


def resolve_index_type(manifest: Manifest) -> None:
    """Settle a new store's "auto" index type for an empty store, and validate the type."""
    if manifest.index_type == ann.AUTO:
        choice = ann.choose_index(0, manifest.dim)
        manifest.index_type, manifest.index_auto = choice.index_type, True
        manifest.index_reason = f"auto: {choice.reason}"
    new_index(manifest.index_type, manifest.dim)


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every id the index holds (hidden ones included), of every shard."""
    parts = [faiss.vector_to_array(faiss.downcast_index(part).id_map)
             for part in ann.shard_list(index)]
    return np.concatenate(parts).astype(np.int64)


def max_id(index: faiss.Index) -> int:
    ids = index_ids(index)
    return int(ids.max()) if ids.size else 0


def supports_removal(index: faiss.Index) -> bool:
    """Only flat storage compacts on removal, as IndexIDMap2's id map assumes; removing from an
    IVF inside it leaves the map pointing at the wrong rows, so IVF hides removals like HNSW."""
    return isinstance(ann.inner_index(index), faiss.IndexFlat)


class VectorIndex:
    """The store's FAISS index in memory and its file: what the store searches and saves.

    ``all_vectors`` reads every stored (ids, vectors) pair and the rows' vectors token: the
    index is rebuilt from it whenever it cannot be used or must be trained. Removed ids that a
    graph index cannot drop are hidden (``tombstones``) until enough pile up to be worth a
    rebuild.

    ``synced`` is the vectors token (database.vectors_token) of the rows whose ids the index
    holds, when known; a save records it with the file (and the hidden ids), so a later open
    whose rows still have that token uses the file as it is, with no id-by-id comparison."""

    def __init__(self, root: Path, manifest: Manifest, *, readonly: bool,
                 all_vectors: Callable[[], tuple[np.ndarray, np.ndarray, str | None]]) -> None:
        self.root, self.manifest, self.readonly = root, manifest, readonly
        self.path = root / INDEX_FILE
        self._all_vectors = all_vectors
        self.tombstones = np.zeros(0, np.int64)
        #: Why the index file on disk could not be used (None: it was fine or absent).
        self.problem: str | None = None
        #: Changed since the last save.
        self.dirty = False
        #: The rows' vectors token the live ids match (None: not known; see the class).
        self.synced: str | None = None
        #: token → hidden ids, of the saves the loaded file matched (see indexfile).
        self.saved: dict[str, np.ndarray] = {}
        self.index = new_layout(manifest.index_type, manifest.dim, manifest.index_shards)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def shards(self) -> int:
        """Shards of the index in memory (1: unsharded); the manifest's layout until a
        rebuild into another count is saved."""
        return len(ann.shard_list(self.index))

    def layout(self) -> dict:
        """What `medsearch info` shows of the layout: shard count and vectors per shard."""
        return {"index_shards": self.shards, "shard_sizes": shard_sizes(self.index)}

    def _empty(self) -> faiss.Index:
        return new_layout(self.manifest.index_type, self.dim, self.manifest.index_shards)

    @property
    def count(self) -> int:
        """Live vectors in the index (hidden deleted ones not counted)."""
        return int(self.index.ntotal) - int(self.tombstones.size)

    def ids(self) -> np.ndarray:
        """Every id in the index, hidden ones included."""
        return index_ids(self.index)

    def max_id(self) -> int:
        return max_id(self.index)

    # -- loading and checking ---------------------------------------------------------------
    def load(self, full_check: bool = False) -> None:
        """The saved index if it passes the manifest's checks; never a damaged one."""
        index, problem, self.saved = read_index_files(self.root, self.manifest, full=full_check)
        self.synced = None
        if problem:
            self.damaged(problem)
        if index is not None and not self._type_matches(index):
            # a kill between the manifest naming a new type (reindex) and the index file of
            # that type being saved leaves the old file: rebuilt, as the manifest says
            self.damaged(f"it holds another index type than {self.manifest.index_type}")
            index = None
        if index is None:
            self.saved = {}
        self.index = ann.enable_lookup(index) if index is not None else self._empty()
        self.tombstones = np.zeros(0, np.int64)

    def trust_saved(self, token: str | None) -> bool:
        """Take the loaded file as matching the rows, without comparing ids, when it was saved
        from rows that still have ``token`` (their vectors token now): any write of vectors
        since would have replaced it. Returns whether it did."""
        hidden = self.saved.get(token) if token else None
        if hidden is None or self.problem:
            return False
        self.tombstones = np.unique(hidden)
        self.synced = token
        return True

    def _type_matches(self, index: faiss.Index) -> bool:
        """The file holds the manifest's index type (or exact Flat while that type waits for
        enough vectors to be trained)."""
        empty = new_index(self.manifest.index_type, self.dim)
        got, want = ann.inner_index(index), ann.inner_index(empty)
        return isinstance(got, type(want)) or (isinstance(got, faiss.IndexFlat)
                                               and not empty.is_trained)

    def damaged(self, problem: str) -> None:
        self.problem = problem
        if self.readonly:
            log.warning("index file %s is not used: %s; searching an index rebuilt in memory "
                        "from the stored vectors. Run `medsearch repair` on %s to fix "
                        "the file", self.path, problem, self.root)
        else:
            log.warning("index file %s is not used: %s; rebuilding it from the stored vectors "
                        "in %s", self.path, problem, self.root)

    def verify_file(self) -> str | None:
        """Check the file on disk in full (size, crc32, sha256, id count); on a new problem the
        loaded index is dropped (the caller reconciles it from the rows). Returns the problem."""
        index, problem, _ = read_index_files(self.root, self.manifest, full=True)
        del index
        if problem and self.problem is None:
            self.damaged(problem)
            self.index = self._empty()
            self.tombstones = np.zeros(0, np.int64)
            self.synced, self.saved = None, {}
            self.dirty = True
        return problem

    # -- changes ----------------------------------------------------------------------------
    def follow(self, removed: np.ndarray, added: np.ndarray, vectors: np.ndarray | None,
               token: str | None) -> None:
        """Follow committed rows: drop ``removed`` ids, add ``added`` with their ``vectors``
        (None: not read, as for an untrained index, which is rebuilt from the rows); ``token``
        is the rows' vectors token after these changes (None: not known).

        A rebuild on the way reads every row, the added ones included, so nothing is added
        after it (that would hold those ids twice)."""
        if removed.size and self._remove(removed):
            return
        if added.size:
            self.dirty = True
            if vectors is None or not self.index.is_trained:
                self.rebuild(self.manifest.index_type)
                return
            ann.add_by_shard(self.index, added, vectors)
        self.synced = token

    def hide(self, extra: np.ndarray, token: str | None) -> None:
        """The index was checked against the rows of ``token``: it holds every id they have,
        and ``extra`` (removed ids) besides, which are hidden from now on."""
        self.tombstones = np.union1d(self.tombstones, extra)
        self.synced = token

    def _remove(self, ids: np.ndarray) -> bool:
        """Remove ids; a graph index that cannot remove hides them, rebuilding only when
        they exceed ~2% of it (rebuilding an HNSW graph per changed file would cost minutes).
        Returns whether it rebuilt."""
        self.dirty = True
        if supports_removal(self.index):
            ann.remove_by_shard(self.index, ids)
            return False
        self.tombstones = np.union1d(self.tombstones, ids)
        if self.tombstones.size > max(TOMBSTONE_MIN, TOMBSTONE_FRACTION * self.index.ntotal):
            self.rebuild(self.manifest.index_type)
            return True
        return False

    def rebuild(self, index_type: str, shards: int | None = None) -> None:
        """Build a fresh index of ``index_type`` ("auto": chosen for the count) from the
        stored raw vectors, in ``shards`` shards (None: as many as now) trained as ONE index;
        a type that needs more vectors to train than the store holds is searched exactly
        until it has them (see :meth:`status`). The layout reaches the manifest at save."""
        shards = self.shards if shards is None else int(shards)
        if shards < 1:
            raise StoreError(f"a sharded index needs at least 1 shard, not {shards}")
        ids, vectors, token = self._all_vectors()
        m = self.manifest
        auto = index_type == ann.AUTO or (m.index_auto and index_type == m.index_type)
        if index_type == ann.AUTO:
            choice = ann.choose_index(len(ids), self.dim)
            index_type, reason = choice.index_type, f"auto: {choice.reason}"
        else:
            reason = m.index_reason if auto else "chosen by the user"
        index, trained_on = new_index(index_type, self.dim), None
        if not index.is_trained:
            if len(ids) < self.training_minimum(index_type):
                index = new_index("Flat", self.dim)  # exact until there is enough to train on
            else:
                sample = ann.training_sample(vectors)
                try:
                    index.train(sample)
                except RuntimeError as exc:
                    raise StoreError(f"FAISS could not train index type {index_type!r} on "
                                     f"{len(sample):,} vectors: {str(exc).splitlines()[-1]}; "
                                     "choose another index type and rebuild (`medsearch reindex`)",
                                     setting="index_type") from None
                trained_on = len(sample)
        index = ann.sharded(ann.split_trained(index, shards)) if shards > 1 else index
        if len(ids):
            ann.add_by_shard(index, ids, vectors)
        self.index = index
        self.tombstones = np.zeros(0, np.int64)
        self.synced = token
        new = (index_type, auto, reason, trained_on)
        if new != (m.index_type, m.index_auto, m.index_reason, m.index_trained_on):
            m.index_type, m.index_auto, m.index_reason, m.index_trained_on = new
            if not self.readonly:
                m.write(self.root / MANIFEST)
        self.dirty = True

    # -- maintenance --------------------------------------------------------------------------
    def status(self) -> dict:
        """The index actually in memory: the manifest's type, or exact search while that type
        waits for enough vectors to be trained."""
        needed = self.training_minimum(self.manifest.index_type)
        waiting = bool(needed) and isinstance(ann.inner_index(self.index), faiss.IndexFlat)
        return {"index_in_use": "Flat" if waiting else self.manifest.index_type,
                "index_trained_on": self.manifest.index_trained_on,
                "index_waiting_for": needed if waiting else None}

    def training_minimum(self, index_type: str) -> int:
        if not ann.needs_training(index_type, self.dim):
            return 0
        return max(ann.training_minimum(index_type), 1)

    def training_due(self) -> bool:
        status = self.status()
        if status["index_waiting_for"]:
            return self.count >= status["index_waiting_for"]
        return ann.retraining_due(self.manifest.index_type,
                                           self.manifest.index_trained_on, self.count)

    def maintenance_due(self) -> str | None:
        """What :meth:`maintain` would do now: "rebuild" (an automatic store outgrew, or shrank
        below, its index type), "retrain" (enough new vectors to train on), or None."""
        m = self.manifest
        if m.index_auto and ann.choose_index(self.count, self.dim).index_type != m.index_type:
            return "rebuild"
        return "retrain" if self.training_due() else None

    def maintain(self) -> dict:
        """Re-choose an automatic index type for today's count and train a type that has
        enough vectors now; returns what was done ({"action": rebuilt|retrained|nothing})."""
        m, action = self.manifest, "nothing"
        if m.index_auto:
            choice = ann.choose_index(self.count, self.dim)
            if choice.index_type != m.index_type:
                self.rebuild(ann.AUTO)  # the collection outgrew (or shrank below) it
                action = "rebuilt"
            elif m.index_reason != f"auto: {choice.reason}":
                m.index_reason = f"auto: {choice.reason}"  # the reason for today's size
                if not self.readonly:
                    m.write(self.root / MANIFEST)
        if self.training_due():
            self.rebuild(m.index_type)
            action = "retrained" if action == "nothing" else action
        return {"action": action, "index_type": m.index_type, **self.status()}

    # -- saving -------------------------------------------------------------------------------
    def write(self, high_water: int) -> int:
        """Write the index so that every error raises and a bad file never replaces a good one;
        returns the id high-water mark the manifest now records. The rows' token the index
        matches (``synced``) is recorded with the file, and the ids it hides.

        The bytes go through os.write to a unique owner-only temp file (faiss.write_index
        reports a failed close only on stderr), are read back and compared, fsynced; then the
        manifest records the new file (keeping the previous record, see index_records), and
        only then is the file renamed into place and the folder fsynced."""
        token = self.synced if self.tombstones.size <= HIDDEN_RECORDED_MAX else None
        if self.shards > 1:
            self.manifest.id_high_water = write_shard_files(
                self.index, self.root, self.manifest, high_water, token, self.tombstones)
            self._saved_as(token)
            return self.manifest.id_high_water
        path = self.path
        try:
            out = AtomicFile(path)
        except OSError as exc:
            raise write_error(path, exc) from None
        before = asdict(self.manifest)
        try:
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(out.write, CHUNK))
            out.finish(verify=True)
            m = self.manifest
            records = index_records(m)
            m.index_previous = records[0] if records else None
            m.index_size, m.index_count = out.size, int(self.index.ntotal)
            m.index_crc32, m.index_sha256 = out.crc, out.sha.hexdigest()
            m.index_token = token
            m.index_hidden = self.tombstones.tolist() if token else None
            m.id_high_water = int(max(high_water, max_id(self.index)))
            m.index_shards, m.index_shard_files = 1, None
            m.write(self.root / MANIFEST)
            out.replace()
        except OSError as exc:
            out.abort()
            self.manifest.__dict__.update(before)
            raise write_error(path, exc) from None
        except BaseException:
            out.abort()
            self.manifest.__dict__.update(before)
            raise
        remove_stale_files(self.root, 1)
        self._saved_as(token)
        return self.manifest.id_high_water

    def _saved_as(self, token: str | None) -> None:
        self.dirty = False
        self.saved = {token: self.tombstones.copy()} if token else {}

    @property
    def token_unrecorded(self) -> bool:
        """The index matches known rows that no saved file records (a save would let later
        opens skip comparing ids)."""
        return self.synced is not None and self.synced not in self.saved

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None,
               fetch_vectors: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids): exact for Flat, bitmap filters with widened HNSW/IVF search,
        exact re-ranking for PQ codes, hidden ids left out, shards searched in parallel and
        merged (retrieval/ann/search.py)."""
        search = ann.search_shards if self.shards > 1 else ann.search_index
        return search(self.index, queries, k, allowed=allowed, fetch_vectors=fetch_vectors,
                      hidden=self.tombstones, rerank=ann.rerank_for(self.manifest.index_type))
