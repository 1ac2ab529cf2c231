"""Where a store's rows live, and everything that differs between the two back ends.

A store keeps its rows in SQLite inside its folder (the default) or in a PostgreSQL database
named by a ``postgresql+psycopg://`` URL. rows.py and writer.py speak portable SQL; what
cannot be portable lives here, one branch per dialect: connection set-up, one-snapshot
reads, the image id counter, the writer lock, the commit counter readers poll, and the
SQLite-only file operations (online backup, a "has rows" probe).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Boolean, Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.functions import FunctionElement

from ..errors import StoreBusyError, StoreError

#: A database holds one store, so one constant key names its writer (advisory locks are
#: scoped to the database they are taken in).
WRITER_LOCK_KEY = int.from_bytes(hashlib.blake2b(b"medsearch store writer", digest_size=8)
                                 .digest(), "big", signed=True)
#: The settings row holding the manifest a store was created with: a new folder over the
#: same database (another server's cache) adopts it.
MANIFEST_SETTING = "store.manifest"


def is_postgres(url: str | None) -> bool:
    return bool(url) and str(url).startswith("postgresql")


def check_url(url: str) -> str:
    """A usable PostgreSQL URL, or an error naming the ``db`` setting."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None
    if parsed is None or parsed.drivername != "postgresql+psycopg" or not parsed.database:
        raise StoreError(f"db = {public_url(url)!r} is not a PostgreSQL URL like "
                         "postgresql+psycopg://USER@HOST:PORT/DATABASE (leave it unset for "
                         "SQLite in the store folder)", setting="db")
    return url


def public_url(url: str) -> str:
    """The URL without its password (what a manifest records and messages show)."""
    try:
        return make_url(url).set(password=None).render_as_string(hide_password=False)
    except ArgumentError:
        return re.sub(r"//([^:/@]*):[^@]*@", r"//\1@", str(url))


#: SQLite page size of a new database: a float16 vector of 1152 values (2.3 KB) does not fit
#: twice in a default 4 KB page, so each row took a page (4.1 KB a vector, vs 2.35 KB with
#: 16 KB pages; measured in benchmarks/results/float16_vectors.json).
SQLITE_PAGE_SIZE = 16_384


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # only a new, empty file takes it
    cursor.execute("PRAGMA journal_mode=WAL")      # readers keep working while an index run writes
    cursor.execute("PRAGMA synchronous=NORMAL")    # WAL + NORMAL survives a killed process
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(location: Path | str) -> Engine:
    """The engine of a store's database: a SQLite file path or a PostgreSQL URL."""
    if is_postgres(str(location)):
        # pre_ping: a server restarted under a long-running reader costs one retry, not an error
        return create_engine(str(location), hide_parameters=True, pool_pre_ping=True)
    engine = create_engine(f"sqlite:///{location}", hide_parameters=True)  # no data in logs
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def connect_error(url: str, exc: Exception) -> StoreError:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return StoreError(f"cannot use the database {public_url(url)}: {reason}", setting="db")


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose reads all see one moment: a whole committed batch or none of it."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                yield conn
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("BEGIN")  # pysqlite begins lazily; WAL: writers go on
        yield conn


def quick_check(conn: Connection) -> list[str]:
    """The database's own consistency check (PostgreSQL checks its pages itself)."""
    if conn.dialect.name == "postgresql":
        return ["ok"]
    return [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check").all()]


def max_handed_out_id(conn: Connection) -> int:
    """The image id counter's value: the highest id the database has handed out."""
    if conn.dialect.name == "postgresql":
        seq = conn.scalar(text("SELECT pg_get_serial_sequence('images', 'id')"))
        value = conn.execute(text(f"SELECT last_value, is_called FROM {seq}")).one()
        return int(value[0]) if value[1] else 0
    return int(conn.exec_driver_sql(
        "SELECT seq FROM sqlite_sequence WHERE name = 'images'").scalar() or 0)


def raise_id_counter(session: Session, high_water: int) -> None:
    """Make the database hand out only image ids above ``high_water``."""
    if session.get_bind().dialect.name == "postgresql":
        # setval outside the transaction's undo: a counter only ever moves up, never back
        session.execute(text(
            "SELECT setval(pg_get_serial_sequence('images', 'id'), :hw) "
            "WHERE (SELECT CASE WHEN is_called THEN last_value ELSE 0 END "
            "FROM images_id_seq) < :hw"), {"hw": high_water})
        return
    session.execute(text("UPDATE sqlite_sequence SET seq = :hw "
                         "WHERE name = 'images' AND seq < :hw"), {"hw": high_water})
    session.execute(text("INSERT INTO sqlite_sequence (name, seq) SELECT 'images', :hw "
                         "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence "
                         "WHERE name = 'images')"), {"hw": high_water})


def zero_freed_pages(session: Session) -> None:
    """SQLite's secure_delete for this transaction (PostgreSQL: see :func:`compact_table`)."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("PRAGMA secure_delete=ON"))


def compact_table(engine: Engine, table: str | None = None) -> None:
    """Drop what deleted rows left behind. SQLite: copy the WAL into the database and
    truncate it (old page images hold deleted rows). PostgreSQL: ``table`` is rewritten
    (VACUUM FULL: its old row versions leave the file); None: every table is vacuumed (dead
    row versions become free space, overwritten as the tables grow)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM FULL {table}" if table else "VACUUM")
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def bump_commits(session: Session) -> None:
    """PostgreSQL: count this write transaction in ``store_state`` (readers poll it); SQLite
    readers use ``PRAGMA data_version`` instead, which needs no write."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("UPDATE store_state SET commits = commits + 1 WHERE id = 1"))


def vectors_token(conn: Connection | Session) -> str | None:
    """The random token that every change to the vectors table replaces, by a trigger, so
    any writer (an older medsearch, a hand-run SQL statement) changes it (migration 0005)."""
    return conn.execute(text("SELECT vectors_token FROM store_state WHERE id = 1")).scalar()


class glob_match(FunctionElement):
    """``column GLOB pattern`` (SQLite's case-sensitive shell glob); PostgreSQL runs the
    same pattern as an anchored regular expression."""

    type = Boolean()
    inherit_cache = True
    name = "glob_match"

    def __init__(self, column, pattern: str) -> None:
        from sqlalchemy import literal

        super().__init__(column, literal(pattern), literal(glob_to_regex(pattern)))


@compiles(glob_match)
def _glob_sqlite(element, compiler, **kw) -> str:
    column, pattern, _ = list(element.clauses)
    return f"({compiler.process(column, **kw)} GLOB {compiler.process(pattern, **kw)})"


@compiles(glob_match, "postgresql")
def _glob_postgres(element, compiler, **kw) -> str:
    column, _, regex = list(element.clauses)
    return f"({compiler.process(column, **kw)} ~ {compiler.process(regex, **kw)})"


def glob_to_regex(pattern: str) -> str:
    """SQLite GLOB semantics as a POSIX regex: * ? [set] [^set], everything else literal."""
    out, i = ["^"], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and (end := _set_end(pattern, i)) > 0:
            negate = pattern[i + 1:i + 2] == "^"
            body = pattern[i + 1 + negate:end]
            # in PostgreSQL's brackets a backslash escapes and "[:" opens a class: literal here
            body = body.replace("\\", "\\\\").replace("[", "\\[")
            out.append("[" + ("^" if negate else "") + body + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out) + "$"


def _set_end(pattern: str, start: int) -> int:
    """Index of the "]" closing the set opened at ``start`` (a leading "]" is a member)."""
    j = start + 1 + (pattern[start + 1:start + 2] == "^")
    j += pattern[j:j + 1] == "]"
    return pattern.find("]", j)


class WriterLock:
    """The one writer of a store: the folder's file lock (its index and manifest) and, for a
    PostgreSQL store, a session advisory lock held on a connection of its own for the
    writer's life (the server drops it when the process dies, as the kernel drops a flock)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._engine: Engine | None = None
        self._conn: Connection | None = None

    def ensure_advisory(self, url: str | None) -> None:
        """Also hold the advisory lock of the PostgreSQL database ``url`` (None: SQLite)."""
        if is_postgres(url) and self._conn is None:
            self._add_advisory(url)

    def _add_advisory(self, url: str) -> None:
        engine = create_engine(url, poolclass=NullPool, hide_parameters=True)
        try:
            conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            got = conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": WRITER_LOCK_KEY})
        except SQLAlchemyError as exc:
            engine.dispose()
            raise connect_error(url, exc) from None
        if not got:
            conn.close()
            engine.dispose()
            raise StoreBusyError(f"another process is writing to the store in {public_url(url)} "
                             "(it holds the database's writer lock); wait for it to finish and "
                             "run the command again")
        self._engine, self._conn = engine, conn

    def release(self) -> None:
        import os

        try:
            if self._conn is not None:
                self._conn.close()  # ends the session: the advisory lock goes with it
                self._engine.dispose()
        finally:
            self._conn = self._engine = None
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class CommitCounter:
    """A number that moves when another process commits to the store, read cheaply per request.

    SQLite: ``PRAGMA data_version`` on a connection of its own. PostgreSQL: the
    ``store_state`` row the writer bumps in every write transaction (one indexed read)."""

    def __init__(self, location: Path | str, engine: Engine | None = None) -> None:
        self._engine = engine if is_postgres(str(location)) else None
        self._db = None if self._engine is not None else sqlite3.connect(
            location, check_same_thread=False)

    def read(self) -> int:
        if self._engine is not None:
            with self._engine.connect() as conn:
                return int(conn.scalar(text("SELECT commits FROM store_state WHERE id = 1")) or 0)
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


def database_has_rows(path: Path) -> bool:
    try:
        with sqlite3.connect(path) as con:
            return bool(con.execute("SELECT EXISTS (SELECT 1 FROM files)").fetchone()[0])
    except sqlite3.Error:
        return False


def copy_database(source: Path, dest: Path) -> None:
    """One consistent snapshot of a SQLite database in use, with SQLite's online backup API."""
    src = sqlite3.connect(source, timeout=30)
    dst = sqlite3.connect(dest)
    try:
        src.backup(dst)  # pages=-1: the whole database in one step, one snapshot
    finally:
        dst.close()
        src.close()
