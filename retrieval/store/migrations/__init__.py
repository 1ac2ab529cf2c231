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


def config(connection=None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    return ScriptDirectory.from_config(config()).get_current_head()


def current(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest schema (a new file gets every table)."""
    with engine.begin() as connection:
        cfg = config(connection)
        tables = set(inspect(connection).get_table_names())
        if "files" in tables and "alembic_version" not in tables:
            command.stamp(cfg, BASELINE)  # made by an early build with create_all
        command.upgrade(cfg, "head")
