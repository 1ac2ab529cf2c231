"""Cohort export: search results as flat rows (CSV, JSON, Parquet), optionally with the files.

One row per result: rank, score, id, path, frame and the stored metadata. The columns are fixed
(an empty cohort still has a header) and hold only what the store keeps, so the store's PHI
policy (patient key hashed, kept or dropped at index time) carries over unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import InputError

METADATA_COLUMNS = (
    "width", "height", "modality", "body_part", "study_date", "study_description",
    "series_description", "view_position", "manufacturer", "study_uid", "series_uid", "sop_uid",
    "patient_sex", "patient_age", "patient_key", "source_kind", "labels")
#: prob: SigLIP match probability (text-only queries); group_count: with distinct, the images
#: of the row's patient/study/series the query admits (empty cells otherwise).
COLUMNS = ("rank", "score", "prob", "group_count", "id", "path", "frame") + METADATA_COLUMNS
_INTEGER_COLUMNS = {"rank", "id", "frame", "width", "height", "group_count"}
FORMATS = {".csv": "csv", ".json": "json", ".parquet": "parquet"}
#: A spreadsheet evaluates a cell that begins with one of these (OWASP "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json",
               "parquet": "application/vnd.apache.parquet"}


def cohort_rows(results: Iterable[dict]) -> list[dict]:
    """Result JSON (``Result.to_json()``) → flat rows with exactly :data:`COLUMNS`."""
    rows = []
    for rank, result in enumerate(results, 1):
        meta = result.get("metadata", {})
        row = {"rank": rank, "score": result["score"], "prob": result.get("prob"),
               "group_count": result.get("group_count"), "id": result["id"],
               "path": result["path"], "frame": result.get("frame", 0)}
        for name in METADATA_COLUMNS:
            row[name] = meta.get(name)
        row["labels"] = ";".join(label["label"] if isinstance(label, dict) else str(label)
                                 for label in meta.get("labels", [])) or None
        rows.append(row)
    return rows


def format_for(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"cohort file {path}: the name must end in .csv, .json or .parquet "
                         "(that chooses the format)")
    return FORMATS[suffix]


def to_bytes(rows: list[dict], fmt: str) -> bytes:
    """Serialise rows in one of csv / json / parquet."""
    if fmt == "csv":
        text = io.StringIO()
        # RFC 4180 line ends: with "\n" alone, Python leaves a CR inside a value unquoted and
        # a reader splits the row there.
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows({name: _cell(value) for name, value in row.items()} for row in rows)
        return text.getvalue().encode("utf-8")
    if fmt == "json":
        return (json.dumps(rows, indent=1) + "\n").encode("utf-8")
    if fmt == "parquet":
        return _parquet(rows)
    raise InputError(f"unknown export format {fmt!r}; use csv, json or parquet")


def _cell(value):
    """A CSV cell a spreadsheet shows as text: text that would start a formula gets a leading '.

    Only text is touched (numbers such as a negative score stay numbers), and only in CSV:
    JSON and Parquet keep the stored values exactly."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {name: pa.int64() if name in _INTEGER_COLUMNS else pa.string() for name in COLUMNS}
    types["score"] = types["prob"] = pa.float64()
    schema = pa.schema([(name, types[name]) for name in COLUMNS])
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_rows(rows: list[dict], out: str | Path) -> Path:
    """Write atomically (temp file + rename) in the format named by ``out``'s suffix."""
    out = Path(out).expanduser()
    return write_file(out, to_bytes(rows, format_for(out)), "cohort file")


def write_file(out: Path, data: bytes, what: str) -> Path:
    """A user's output file, written whole or not at all (temp file + rename). Only a regular
    file is replaced: renaming over ``/dev/null`` or a FIFO would put a file in its place."""
    if not out.parent.is_dir():
        raise InputError(f"{what} {out}: folder {out.parent} does not exist")
    if out.exists() and not out.is_file():
        raise InputError(f"{what} {out}: not a regular file; name a file to write")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{what} {out}: cannot write it ({exc.strerror or exc})") from None
    return out


@dataclass
class FilesReport:
    """What --copy-to / --link-to did: files placed, and sources that could not be."""

    placed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"placed": len(self.placed), "skipped": self.skipped}


def place_files(rows: list[dict], folder: str | Path, mode: str) -> FilesReport:
    """Copy or symlink each result's source file into ``folder`` (once per source file).

    Names are ``<rank>-<id>-<file name>`` so results with the same file name never collide
    and the folder lists in rank order. Sources that are not local files (e.g. DICOMweb) or no
    longer exist are reported, not fatal.
    """
    if mode not in ("copy", "link"):
        raise ValueError(mode)
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    report, done = FilesReport(), set()
    for row in rows:
        source = Path(row["path"])
        if row["path"] in done:
            continue
        done.add(row["path"])
        if row.get("source_kind") not in (None, "image", "dicom") or not source.is_file():
            report.skipped.append({"id": row["id"], "path": row["path"],
                                   "reason": "not a readable local file"})
            continue
        target = folder / f"{row['rank']:04d}-{row['id']}-{source.name}"
        try:
            if target.exists() or target.is_symlink():
                target.unlink()
            if mode == "copy":
                shutil.copy2(source, target)
            else:
                target.symlink_to(source.absolute())
        except OSError as exc:
            report.skipped.append({"id": row["id"], "path": row["path"], "reason": str(exc)})
            continue
        report.placed.append({"id": row["id"], "path": row["path"], "to": str(target)})
    return report
