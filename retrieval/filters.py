"""Metadata filters: what a search may return, turned into a SQL query for image ids."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the SQL is built only where a store is open: a filter alone needs no SQLAlchemy
    from sqlalchemy import Select


#: Bounds on a path glob: SQLite refuses patterns over 50,000 bytes with an error, and each
#: wildcard multiplies the work per path; real globs are short.
MAX_GLOB_LENGTH = 1024
MAX_GLOB_WILDCARDS = 64
#: The same bound as a regular expression (for the API schema): at most MAX_GLOB_WILDCARDS of * ? [.
GLOB_PATTERN = rf"^[^*?\[]*(?:[*?\[][^*?\[]*){{0,{MAX_GLOB_WILDCARDS}}}$"


def check_glob(value: str | None) -> str | None:
    """A path glob within the bounds, or an error that says which bound."""
    if value is None:
        return None
    from .errors import InputError

    if len(value) > MAX_GLOB_LENGTH:
        raise InputError(f"path_glob is {len(value)} characters long; at most {MAX_GLOB_LENGTH}")
    if sum(value.count(c) for c in "*?[") > MAX_GLOB_WILDCARDS:
        raise InputError(f"path_glob has more than {MAX_GLOB_WILDCARDS} wildcards (* ? [)")
    return value


def _date(value: str | None, name: str) -> str | None:
    """Accept YYYYMMDD or YYYY-MM-DD (DICOM stores the former)."""
    if value is None:
        return None
    digits = value.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        from .errors import InputError

        raise InputError(f"{name} must be a date like 2024-01-31, got {value!r}")
    return digits


@dataclass
class Filters:
    """Every field narrows the result set; lists match any of their values."""

    modality: list[str] = field(default_factory=list)
    body_part: list[str] = field(default_factory=list)
    date_from: str | None = None
    date_to: str | None = None
    path_glob: str | None = None
    label: list[str] = field(default_factory=list)
    min_label_score: float | None = None

    def __post_init__(self) -> None:
        self.date_from = _date(self.date_from, "date_from")
        self.date_to = _date(self.date_to, "date_to")
        self.path_glob = check_glob(self.path_glob)

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self) if f.name != "min_label_score")

    @classmethod
    def from_dict(cls, data: dict | None) -> "Filters":
        data = dict(data or {})
        for key in ("modality", "body_part", "label"):
            if isinstance(data.get(key), str):
                data[key] = [data[key]]
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            from .errors import InputError

            raise InputError(f"unknown filter field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def query(self) -> Select:
        """SELECT images.id for every row the filters admit."""
        from sqlalchemy import and_, exists, select

        from .store.database import glob_match
        from .store.schema import FileRow, ImageRow, LabelRow

        clauses = []
        if self.modality:
            clauses.append(ImageRow.modality.in_([m.upper() for m in self.modality]))
        if self.body_part:
            clauses.append(ImageRow.body_part.in_([b.upper() for b in self.body_part]))
        if self.date_from:
            clauses.append(ImageRow.study_date >= self.date_from)
        if self.date_to:
            clauses.append(ImageRow.study_date <= self.date_to)
        stmt = select(ImageRow.id)
        if self.path_glob:
            stmt = stmt.join(FileRow, FileRow.id == ImageRow.file_id)
            clauses.append(glob_match(FileRow.path, self.path_glob))  # GLOB on either back end
        if self.label:
            label_match = and_(LabelRow.image_id == ImageRow.id, LabelRow.label.in_(self.label))
            if self.min_label_score is not None:
                label_match = and_(label_match, (LabelRow.score.is_(None))
                                   | (LabelRow.score >= self.min_label_score))
            clauses.append(exists().where(label_match))
        return stmt.where(and_(*clauses)) if clauses else stmt
