"""Saved cohorts: a name, how it was made (provenance JSON) and its members in rank order.

Revision ID: 0004_cohorts
Revises: 0003_float16_vectors

Members name image ids without a foreign key: an image removed or forgotten later stays listed
in the saved cohort, so `cohort diff` can say it left (the id alone identifies no one).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_cohorts"
down_revision = "0003_float16_vectors"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "cohorts" in sa.inspect(op.get_bind()).get_table_names():
        return  # an unstamped store adopted at the baseline may already hold these tables
    op.create_table(
        "cohorts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created", sa.String(32), nullable=False),
        sa.Column("refreshed", sa.String(32)),
        sa.Column("provenance", sa.Text, nullable=False))
    op.create_table(
        "cohort_members",
        sa.Column("cohort_id", sa.Integer, sa.ForeignKey("cohorts.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("rank", sa.Integer, primary_key=True),
        sa.Column("image_id", sa.BigInteger, nullable=False),
        sa.Column("score", sa.Float))


def downgrade() -> None:
    op.drop_table("cohort_members")
    op.drop_table("cohorts")
