"""Raw vectors as float16: every float32 blob rewritten in committed batches.

Revision ID: 0003_float16_vectors
Revises: store_state

Restartable: a blob's length tells the formats apart (4·dim bytes: float32, 2·dim: float16),
so a run killed part-way leaves converted and unconverted rows that readers both decode, the
revision unstamped, and the next writable open converts only what is left. Each batch is its
own transaction (a 100M-row table is not rewritten in one). A float32 value beyond float16's
range (only an unnormalised vector has one) stays float32, which readers still decode. The
FAISS index file stays valid: it holds its own codes. The format is recorded in the settings
row ``vector_format``.
"""

from __future__ import annotations

import logging

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0003_float16_vectors"
down_revision = "store_state"
branch_labels = None
depends_on = None

log = logging.getLogger("retrieval.store")

#: Rows rewritten per committed transaction (~9 MB of float32 at d=1152).
BATCH = 2_000
FORMAT_SETTING, FORMAT = "vector_format", "float16"


def _dim() -> int:
    dim = op.get_context().config.attributes.get("dim") if op.get_context().config else None
    if not dim:
        raise RuntimeError("migration 0003 converts stored vectors and needs the store's vector "
                           "size; open the store with medsearch (Store.open) to upgrade it")
    return int(dim)


def convert(connection: sa.Connection, dim: int, source: np.dtype, target: np.dtype,
            batch: int = BATCH) -> int:
    """Rewrite every blob of ``source`` values as ``target`` values, ``batch`` rows per
    committed transaction, in id order; returns the rows converted. ``connection`` is in
    autocommit mode, so BEGIN/COMMIT here delimit each batch."""
    size = np.dtype(source).itemsize * dim
    begin = "BEGIN IMMEDIATE" if connection.dialect.name == "sqlite" else "BEGIN"  # writer now
    select = sa.text("SELECT image_id, vector FROM vectors WHERE image_id > :after "
                     "AND length(vector) = :size ORDER BY image_id LIMIT :batch")
    update = sa.text("UPDATE vectors SET vector = :vector "
                     "WHERE image_id = :id AND length(vector) = :size")
    after, done = -1, 0
    while True:
        connection.exec_driver_sql(begin)
        try:
            rows = connection.execute(select, {"after": after, "size": size,
                                               "batch": batch}).all()
            if rows:
                old = np.frombuffer(b"".join(r[1] for r in rows), source).reshape(len(rows), dim)
                with np.errstate(over="ignore"):
                    new = old.astype(target)
                fits = np.isfinite(new).all(axis=1)
                params = [{"vector": new[i].tobytes(), "id": rows[i][0], "size": size}
                          for i in np.flatnonzero(fits)]
                if params:
                    connection.execute(update, params)
                done += len(params)
                after = rows[-1][0]
            connection.exec_driver_sql("COMMIT")
        except BaseException:
            try:
                connection.exec_driver_sql("ROLLBACK")
            except sa.exc.DBAPIError:
                pass  # no transaction left to roll back: the original error says why
            raise
        if len(rows) < batch:
            return done


def _convert_all(source: np.dtype, target: np.dtype) -> None:
    if op.get_bind().execute(sa.text("SELECT 1 FROM vectors LIMIT 1")).first() is None:
        return  # a new or empty store: nothing to rewrite (and no size needed)
    dim = _dim()
    with op.get_context().autocommit_block():
        done = convert(op.get_bind(), dim, np.dtype(source), np.dtype(target))
    log.info("rewrote %d stored vector(s) as %s", done, np.dtype(target).name)


def upgrade() -> None:
    _convert_all(np.dtype("<f4"), np.dtype("<f2"))
    op.execute(sa.text(f"DELETE FROM settings WHERE key = '{FORMAT_SETTING}'"))
    op.execute(sa.text(f"INSERT INTO settings (key, value) VALUES ('{FORMAT_SETTING}', '{FORMAT}')"))


def downgrade() -> None:
    _convert_all(np.dtype("<f2"), np.dtype("<f4"))
    op.execute(sa.text(f"DELETE FROM settings WHERE key = '{FORMAT_SETTING}'"))
