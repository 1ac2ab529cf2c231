"""The persistent text-embedding cache: a repeated text query never loads the text tower.

A SQLite file of its own beside the store (``text-cache.sqlite``), never the store's database
and never under the store's writer lock: a search only reads it, and writes one row on a miss.
Rows are keyed by ``HMAC-SHA256(secret, model key NUL query text)``, so the file holds no query
text and cannot be probed by guessing queries without the secret (the caller derives it from
the store's key, :func:`retrieval.privacy.text_cache_secret`); the value is the float32 vector
and its dimension. Bounded: the least recently used rows beyond ``max_entries`` are dropped.

Nothing here may fail a search: a corrupt file is set aside and made again, a busy one is a
miss, a read-only folder (or any other error opening it) turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from .layout import create_private_file

log = logging.getLogger(__name__)
FILE_NAME = "text-cache.sqlite"
MAX_ENTRIES = 10_000
SCHEMA_VERSION = 1
#: A hit refreshes its row's use time at most this often (a write per hit costs more than LRU gains).
TOUCH_SECONDS = 60.0
BUSY_TIMEOUT_S = 0.2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    key BLOB PRIMARY KEY, dim INTEGER NOT NULL, vector BLOB NOT NULL, used REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vectors_used ON vectors(used);
"""


def normalise(text: str) -> str:
    """The query text as it is embedded (the searcher strips it; nothing else changes tokens)."""
    return text.strip()


class TextVectorCache:
    """Vectors of query texts by keyed hash; every method is safe to call when disabled."""

    def __init__(self, path: Path, secret: bytes, max_entries: int = MAX_ENTRIES) -> None:
        self.path, self.max_entries = Path(path), max(1, int(max_entries))
        self._secret = hmac.new(secret, b"medsearch text-embedding cache", hashlib.sha256).digest()
        self._lock = threading.Lock()
        self._con: sqlite3.Connection | None = None
        self.hits = self.misses = 0
        try:
            self._con = self._open()
        except (sqlite3.DatabaseError, OSError) as exc:
            if self._corrupt(exc):
                self._con = self._recreate(exc)
            else:
                log.info("text-embedding cache %s off (%s)", self.path, exc)

    @classmethod
    def beside(cls, store_root: Path, secret: bytes, **options) -> "TextVectorCache":
        """The cache file of the store in ``store_root``."""
        return cls(Path(store_root) / FILE_NAME, secret, **options)

    @property
    def enabled(self) -> bool:
        return self._con is not None

    # -- file life -------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():
            create_private_file(self.path)
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                              check_same_thread=False)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                con.execute("DROP TABLE IF EXISTS vectors")
            con.executescript(_SCHEMA)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            con.execute("SELECT key FROM vectors LIMIT 1").fetchone()
        except BaseException:
            con.close()
            raise
        return con

    @staticmethod
    def _corrupt(exc: BaseException) -> bool:
        text = str(exc).lower()
        return isinstance(exc, sqlite3.DatabaseError) and (
            "not a database" in text or "malformed" in text or "corrupt" in text)

    def _recreate(self, why: BaseException) -> sqlite3.Connection | None:
        """Set the damaged file aside (it is only a cache) and start an empty one."""
        log.info("text-embedding cache %s is damaged (%s); starting it again", self.path, why)
        if self._con is not None:
            with contextlib.suppress(sqlite3.Error):
                self._con.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(f"{self.path}{suffix}")
        try:
            return self._open()
        except (sqlite3.DatabaseError, OSError) as exc:
            log.info("text-embedding cache %s off (%s)", self.path, exc)
            return None

    def _failed(self, exc: BaseException) -> None:
        """An error in use: a damaged file is made again; anything else (busy) is a miss."""
        if self._corrupt(exc):
            self._con = self._recreate(exc)
        else:
            log.debug("text-embedding cache %s: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._con.close()
                self._con = None

    # -- entries ---------------------------------------------------------------------------------
    def key(self, model_key: str, text: str) -> bytes:
        """The row key: keyed hash of the model and the normalised text (never the text)."""
        message = f"{model_key}\0{normalise(text)}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def get(self, model_key: str, text: str, dim: int | None = None) -> np.ndarray | None:
        """The cached vector, or None (a miss, a row of another dimension, or no cache)."""
        key = self.key(model_key, text)
        with self._lock:
            if self._con is None:
                return None
            try:
                row = self._con.execute("SELECT dim, vector, used FROM vectors WHERE key = ?",
                                        (key,)).fetchone()
                found = row is not None and len(row[1]) == 4 * row[0] and (dim is None
                                                                          or row[0] == dim)
                if found and row[2] < time.time() - TOUCH_SECONDS:
                    self._con.execute("UPDATE vectors SET used = ? WHERE key = ?",
                                      (time.time(), key))
            except sqlite3.Error as exc:
                self._failed(exc)
                found = False
        if not found:
            self.misses += 1
            return None
        self.hits += 1
        return np.frombuffer(row[1], dtype="<f4").astype(np.float32)

    def put(self, model_key: str, text: str, vector: np.ndarray) -> None:
        """Remember one vector, dropping the least recently used rows beyond the bound."""
        vector = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
        key = self.key(model_key, text)
        with self._lock:
            if self._con is None:
                return
            try:
                self._con.execute("BEGIN IMMEDIATE")
                try:
                    self._con.execute("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)",
                                      (key, int(vector.size), vector.tobytes(), time.time()))
                    self._con.execute(
                        "DELETE FROM vectors WHERE used < (SELECT used FROM vectors "
                        "ORDER BY used DESC LIMIT 1 OFFSET ?)", (self.max_entries - 1,))
                    self._con.execute("COMMIT")
                except BaseException:
                    self._con.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                self._failed(exc)

    def __len__(self) -> int:
        with self._lock:
            if self._con is None:
                return 0
            try:
                return int(self._con.execute("SELECT count(*) FROM vectors").fetchone()[0])
            except sqlite3.Error:
                return 0
