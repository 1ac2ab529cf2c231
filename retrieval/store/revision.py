"""The schema revision this code reads and writes, known without importing Alembic.

Opening a store checks its revision first; when it is this one (nearly every open) Alembic,
a quarter of a second to import, is not loaded at all. A new migration in ``migrations/``
updates ``HEAD`` (tests/test_migrations.py checks that the two agree).
"""

from __future__ import annotations

from sqlalchemy import Engine, inspect, text

HEAD = "0005_vectors_token"
#: Older revisions a read-only open reads as they are (it cannot upgrade them): all they lack
#: is the vectors token, so such an open compares every id of the index with the rows.
READABLE_WITHOUT_TOKEN = frozenset({"0004_cohorts"})


def stored_revision(engine: Engine) -> str | None:
    """The revision recorded in the database (None: none recorded, or no such table)."""
    with engine.connect() as connection:
        if "alembic_version" not in inspect(connection).get_table_names():
            return None
        rows = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    return rows[0][0] if len(rows) == 1 else None
