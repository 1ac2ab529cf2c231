"""The tables of a store (SQLite or PostgreSQL): files, one row per embedded image or frame,
vectors, labels, failures, settings, and the commit counter readers poll."""

from __future__ import annotations

from sqlalchemy import (BigInteger, Float, ForeignKey, Integer, LargeBinary, String, Text,
                        UniqueConstraint, Index)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ..phi import PHI_POLICIES, PhiPolicy  # noqa: F401 - re-exported

SCHEMA_VERSION = 1

#: DICOM attributes kept per image (PS3.15 direct identifiers are never among them).
DICOM_FIELDS = {
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "study_date": "StudyDate",
    "study_description": "StudyDescription",
    "series_description": "SeriesDescription",
    "view_position": "ViewPosition",
    "manufacturer": "Manufacturer",
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "sop_uid": "SOPInstanceUID",
    "patient_sex": "PatientSex",
    "patient_age": "PatientAge",
}


#: Row ids: 64-bit everywhere (SQLite's INTEGER already is; AUTOINCREMENT needs that exact
#: type name there), so PostgreSQL ids go past 2**31 as FAISS ids do.
Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class FileRow(Base):
    """One source object (a file, or a DICOMweb instance); the unit of incremental indexing."""

    __tablename__ = "files"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    source_kind: Mapped[str] = mapped_column(String(16))  # image | dicom | dicomweb
    images: Mapped[list["ImageRow"]] = relationship(back_populates="file",
                                                    cascade="all, delete-orphan")


class ImageRow(Base):
    """One embedded image or frame; its id is the vector's id in the FAISS index."""

    __tablename__ = "images"
    # AUTOINCREMENT: ids are never reused, so a stale index entry can never point at a new row.
    __table_args__ = (UniqueConstraint("file_id", "frame"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    file_id: Mapped[int] = mapped_column(Id, ForeignKey("files.id", ondelete="CASCADE"),
                                         index=True)
    frame: Mapped[int] = mapped_column(Integer, default=0)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    body_part: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)  # YYYYMMDD
    study_description: Mapped[str | None] = mapped_column(Text)
    series_description: Mapped[str | None] = mapped_column(Text)
    view_position: Mapped[str | None] = mapped_column(String(16))
    manufacturer: Mapped[str | None] = mapped_column(Text)
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    sop_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_sex: Mapped[str | None] = mapped_column(String(4))
    patient_age: Mapped[str | None] = mapped_column(String(8))
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)
    file: Mapped[FileRow] = relationship(back_populates="images")
    vector: Mapped["VectorRow"] = relationship(cascade="all, delete-orphan", uselist=False)
    labels: Mapped[list["LabelRow"]] = relationship(cascade="all, delete-orphan")


class VectorRow(Base):
    """The raw embedding as float16 bytes (retrieval/store/blobs.py), kept so the index can be
    rebuilt without re-embedding."""

    __tablename__ = "vectors"

    image_id: Mapped[int] = mapped_column(Id, ForeignKey("images.id", ondelete="CASCADE"),
                                          primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class LabelRow(Base):
    """A label on an image: given by a user (score NULL) or predicted (with its score)."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("image_id", "label", "source"),
                      Index("ix_labels_label", "label"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    image_id: Mapped[int] = mapped_column(Id, ForeignKey("images.id", ondelete="CASCADE"),
                                          index=True)
    label: Mapped[str] = mapped_column(Text)
    score: Mapped[float | None] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(32), default="user")


class FailureRow(Base):
    """A source that could not be indexed, with the reason; cleared when it indexes."""

    __tablename__ = "failures"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16), default="failed")  # failed | skipped


class SettingRow(Base):
    """Store-level key/value settings, e.g. the PHI policy and its HMAC secret."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class StoreStateRow(Base):
    """One row: a counter every write transaction bumps on PostgreSQL, so readers on other
    machines learn cheaply that rows changed (SQLite readers use PRAGMA data_version), and a
    random token every write of vectors replaces (the saved index records the one it
    matches, so an open can trust the index without comparing every id)."""

    __tablename__ = "store_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    commits: Mapped[int] = mapped_column(BigInteger, default=0)
    vectors_token: Mapped[str | None] = mapped_column(String(32))


class CohortRow(Base):
    """A saved cohort: its name, kind (search, similar, ids) and provenance (JSON)."""

    __tablename__ = "cohorts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    created: Mapped[str] = mapped_column(String(32))
    refreshed: Mapped[str | None] = mapped_column(String(32))
    provenance: Mapped[str] = mapped_column(Text)


class CohortMemberRow(Base):
    """One image of a cohort at its rank (no foreign key to images: see migration 0004)."""

    __tablename__ = "cohort_members"

    cohort_id: Mapped[int] = mapped_column(Integer, ForeignKey("cohorts.id", ondelete="CASCADE"),
                                           primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(BigInteger)
    score: Mapped[float | None] = mapped_column(Float)
