"""Alembic migrations of a store's schema (SQLite and PostgreSQL alike); run when a store opens.

A schema change in `retrieval/store/schema.py` comes with a new revision in `versions/`
(`alembic revision` with `script_location` pointing here); a test fails while they differ.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

HERE = Path(__file__).parent
#: The revision written before Alembic was introduced (tables made by create_all).
BASELINE = "0001"


def config(connection=None, dim: int | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    cfg.attributes["dim"] = dim  # the store's vector size, for data migrations (0003, float16 vectors)
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(config()).get_current_head()


def current(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, dim: int | None = None) -> None:
    """Bring the database to the newest schema (a new file gets every table).

    Alembic runs one transaction per revision on a connection it controls, so a data
    migration can commit in batches (0003 converts vectors restartably); ``dim`` is the
    store's vector size, which such a migration needs."""
    with engine.connect() as connection:
        cfg = config(connection, dim)
        tables = set(inspect(connection).get_table_names())
        connection.commit()  # end the inspection's transaction: Alembic begins its own
        if "files" in tables and "alembic_version" not in tables:
            command.stamp(cfg, BASELINE)  # made by an early build with create_all
        command.upgrade(cfg, "head")
