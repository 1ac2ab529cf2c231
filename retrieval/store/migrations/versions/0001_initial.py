"""Initial store schema: files, images, vectors, labels, failures, settings.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

# 64-bit ids on PostgreSQL; SQLite's rowid alias must be spelled INTEGER (already 64-bit)
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", Id, primary_key=True),
        sa.Column("path", sa.Text, nullable=False, unique=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("mtime_ns", sa.BigInteger, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False, index=True),
        sa.Column("source_kind", sa.String(16), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "images",
        sa.Column("id", Id, primary_key=True),
        sa.Column("file_id", Id, sa.ForeignKey("files.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("frame", sa.Integer, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("modality", sa.String(16), index=True),
        sa.Column("body_part", sa.String(64), index=True),
        sa.Column("study_date", sa.String(8), index=True),
        sa.Column("study_description", sa.Text),
        sa.Column("series_description", sa.Text),
        sa.Column("view_position", sa.String(16)),
        sa.Column("manufacturer", sa.Text),
        sa.Column("study_uid", sa.String(64), index=True),
        sa.Column("series_uid", sa.String(64), index=True),
        sa.Column("sop_uid", sa.String(64), index=True),
        sa.Column("patient_sex", sa.String(4)),
        sa.Column("patient_age", sa.String(8)),
        sa.Column("patient_key", sa.String(64), index=True),
        sa.UniqueConstraint("file_id", "frame"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "vectors",
        sa.Column("image_id", Id, sa.ForeignKey("images.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("vector", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "labels",
        sa.Column("id", Id, primary_key=True),
        sa.Column("image_id", Id, sa.ForeignKey("images.id", ondelete="CASCADE"),
                  nullable=False, index=True),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("score", sa.Float),
        sa.Column("source", sa.String(32), nullable=False),
        sa.UniqueConstraint("image_id", "label", "source"),
    )
    op.create_index("ix_labels_label", "labels", ["label"])
    op.create_table(
        "failures",
        sa.Column("path", sa.Text, primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("settings", "failures", "labels", "vectors", "images", "files"):
        op.drop_table(table)
