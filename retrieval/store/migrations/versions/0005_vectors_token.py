"""store_state.vectors_token: a random token that every change to the vectors table replaces.

Revision ID: 0005_vectors_token
Revises: 0004_cohorts

A saved index records the token of the rows it was checked against; an open whose rows still
have that token skips comparing every id with them (retrieval/store/__init__.py). Triggers
replace the token, so any writer changes it: this medsearch, an older one, a hand-run SQL
statement, a cascade from deleted images. A token, not a counter: a counter that lost its last
commits (power cut, restored copy) could climb back to a recorded number over other rows.
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0005_vectors_token"
down_revision = "0004_cohorts"
branch_labels = None
depends_on = None

SQLITE_NEW_TOKEN = ("BEGIN UPDATE store_state SET vectors_token = lower(hex(randomblob(16))) "
                    "WHERE id = 1; END")
POSTGRES_FUNCTION = """
CREATE OR REPLACE FUNCTION medsearch_new_vectors_token() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE store_state SET vectors_token = replace(gen_random_uuid()::text, '-', '') WHERE id = 1;
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    bind = op.get_bind()
    columns = {c["name"] for c in sa.inspect(bind).get_columns("store_state")}
    if "vectors_token" not in columns:
        op.add_column("store_state", sa.Column("vectors_token", sa.String(32)))
    op.execute(sa.text("UPDATE store_state SET vectors_token = :token")
               .bindparams(token=secrets.token_hex(16)))
    if bind.dialect.name == "postgresql":
        op.execute(POSTGRES_FUNCTION)
        op.execute("DROP TRIGGER IF EXISTS vectors_token_on_change ON vectors")
        op.execute("CREATE TRIGGER vectors_token_on_change AFTER INSERT OR UPDATE OR DELETE "
                   "OR TRUNCATE ON vectors FOR EACH STATEMENT "
                   "EXECUTE FUNCTION medsearch_new_vectors_token()")
        return
    for event in ("INSERT", "UPDATE", "DELETE"):  # SQLite triggers are per row
        op.execute(f"DROP TRIGGER IF EXISTS vectors_token_on_{event.lower()}")
        op.execute(f"CREATE TRIGGER vectors_token_on_{event.lower()} AFTER {event} ON vectors "
                   + SQLITE_NEW_TOKEN)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS vectors_token_on_change ON vectors")
        op.execute("DROP FUNCTION IF EXISTS medsearch_new_vectors_token()")
    else:
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS vectors_token_on_{event}")
    with op.batch_alter_table("store_state") as batch:
        batch.drop_column("vectors_token")
