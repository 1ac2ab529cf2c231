"""store_state: the commit counter readers of a PostgreSQL store poll (one row).

Revision ID: store_state
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "store_state"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "store_state" in sa.inspect(op.get_bind()).get_table_names():
        return  # a store adopted from before Alembic may have it already (see BASELINE)
    table = op.create_table(
        "store_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("commits", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(table, [{"id": 1, "commits": 0}])


def downgrade() -> None:
    op.drop_table("store_state")
