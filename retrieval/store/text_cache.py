"""The text-embedding cache: a query seen before is answered without loading the text tower.

One small SQLite file per user and checkpoint, in the user's cache folder (not the store: a
search never takes the store's writer lock, a read-only or shared store still gets a cache, and
one user's queries are not left where others can read them). An entry's key is an HMAC of the
query text under the store's secret (with the checkpoint fingerprint and the tower's device and
precision settings), so the file holds no query text, and a text cannot be tested against it
without that secret. Values are float32 vectors. The newest ``limit`` entries are kept. A
damaged file is removed and made again (once per process); any other fault (a full disk, a
lock held too long, a folder it cannot write) turns the cache off for the process; a query is
then embedded as if there were no cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np

from .layout import DIR_MODE, create_private_file

#: Entries kept per file (about 4.6 kB each for 1152-d vectors: ~46 MB at most).
LIMIT = 10_000
_SCHEMA = ("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, dim INTEGER NOT NULL, "
           "vector BLOB NOT NULL, used REAL NOT NULL)",
           # what else a text query needs from the checkpoint (its logit scalars)
           "CREATE TABLE IF NOT EXISTS facts (name TEXT PRIMARY KEY, value TEXT NOT NULL)")


class TextVectorCache:
    """Query text → its vector, for one checkpoint and tower configuration."""

    def __init__(self, folder: Path, secret: bytes, model_fingerprint: str, variant: str = "",
                 *, limit: int = LIMIT) -> None:
        """``variant``: what else changes the vector (device, precision settings)."""
        self.path = Path(folder) / f"text-{model_fingerprint}.sqlite"
        self.secret, self.limit = secret, limit
        self.context = f"{model_fingerprint}\0{variant}\0".encode()
        self._db: sqlite3.Connection | None = None
        self._off = not secret
        self._remade = False

    def key(self, text: str) -> bytes:
        return hmac.new(self.secret, self.context + text.encode("utf-8", "surrogatepass"),
                        hashlib.sha256).digest()

    def _connection(self) -> sqlite3.Connection | None:
        if self._off:
            return None
        if self._db is None:
            try:
                self._db = self._open()
            except (sqlite3.Error, OSError) as exc:
                self._fault(exc)
        return self._db

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        create_private_file(self.path)
        db = sqlite3.connect(self.path, timeout=0.2, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a lost entry is only a miss
            for statement in _SCHEMA:
                db.execute(statement)
        except BaseException:
            db.close()
            raise
        return db

    def _fault(self, exc: BaseException) -> None:
        """A damaged file (not a database, malformed) is only a cache: it is removed and made
        again, once per process. Any other fault turns the cache off for the process."""
        damaged = isinstance(exc, sqlite3.DatabaseError) and any(
            word in str(exc).lower() for word in ("not a database", "malformed", "corrupt"))
        self.close()
        if damaged and not self._remade:
            self._remade = True
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(f"{self.path}{suffix}")
            try:
                self._db = self._open()
                return
            except (sqlite3.Error, OSError):
                pass
        self._off = True

    def get(self, text: str) -> np.ndarray | None:
        """The cached vector, or None (not cached, or the cache is off)."""
        db = self._connection()
        if db is None:
            return None
        key = self.key(text)
        try:
            row = db.execute("SELECT dim, vector FROM vectors WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            self._fault(exc)
            return None
        if row is None or len(row[1]) != 4 * int(row[0]):
            return None
        try:  # recently used entries are the ones kept
            db.execute("UPDATE vectors SET used = ? WHERE key = ?", (time.time(), key))
        except sqlite3.Error:
            pass
        return np.frombuffer(row[1], dtype=np.float32).copy()

    def put(self, text: str, vector: np.ndarray) -> None:
        """Remember a query's vector (best effort: a busy or broken cache just skips it)."""
        db = self._connection()
        if db is None:
            return
        vector = np.ascontiguousarray(vector, dtype=np.float32).ravel()
        try:
            db.execute("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)",
                       (self.key(text), int(vector.size), vector.tobytes(), time.time()))
            db.execute("DELETE FROM vectors WHERE key IN (SELECT key FROM vectors "
                       "ORDER BY used DESC LIMIT -1 OFFSET ?)", (self.limit,))
        except sqlite3.Error as exc:
            self._fault(exc)

    def fact(self, name: str):
        """A JSON value remembered about this checkpoint (None: not known)."""
        db = self._connection()
        if db is None:
            return None
        try:
            row = db.execute("SELECT value FROM facts WHERE name = ?", (name,)).fetchone()
            return json.loads(row[0]) if row else None
        except (sqlite3.Error, ValueError):
            return None

    def remember(self, name: str, value) -> None:
        db = self._connection()
        if db is not None:
            try:
                db.execute("INSERT OR REPLACE INTO facts VALUES (?, ?)", (name, json.dumps(value)))
            except sqlite3.Error as exc:
                self._fault(exc)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
