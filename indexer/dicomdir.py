"""Following a DICOMDIR (media directory) to the files it references.

A DICOMDIR holds no image itself; its records name files by ReferencedFileID relative to the
DICOMDIR's folder. Those files often have no suffix and sometimes no preamble, so walking the
folder alone can miss them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pydicom

from .sources import SourceFile


@dataclass(frozen=True)
class RefusedSource(SourceFile):
    """A DICOMDIR record that points outside the DICOMDIR's folder: a failure, never read.

    Its path is ``<DICOMDIR>#<record number>`` (no such file exists); ``reason`` says why.
    """

    reason: str = ""


def _file_id(record) -> list[str]:
    file_id = record.get("ReferencedFileID")
    if not file_id:
        return []
    parts = [file_id] if isinstance(file_id, str) else list(file_id)
    return [str(p).strip() for p in parts]


def dicomdir_references(dicomdir: str | Path) -> tuple[list[Path], list[tuple[int, str]]]:
    """(existing referenced files inside the DICOMDIR's folder, refused records as
    (record number, reason)). A ReferencedFileID that is absolute, climbs out with ``..`` or
    reaches outside through a symlink is refused: a crafted DICOMDIR must not pull arbitrary
    files of the host into search, preview and export."""
    dicomdir = Path(dicomdir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(dicomdir, force=True, specific_tags=["DirectoryRecordSequence"])
        records = ds.get("DirectoryRecordSequence") or []
    except Exception:
        return [], []
    try:
        base = dicomdir.parent.resolve()
    except OSError:
        return [], []
    out, refused, seen = [], [], set()
    for number, record in enumerate(records, 1):
        parts = _file_id(record)
        if not parts:
            continue
        path = dicomdir.parent.joinpath(*parts)
        try:
            inside = path.resolve().is_relative_to(base)
        except (OSError, RuntimeError, ValueError):  # a symlink loop, an invalid name
            inside = False
        if not inside or any(Path(p).is_absolute() for p in parts):
            shown = "\\".join(parts)[:200]
            refused.append((number, f"DICOMDIR {dicomdir} record {number}: ReferencedFileID "
                                    f"{shown!r} points outside the DICOMDIR's folder; refused, "
                                    "not read"))
            continue
        if path not in seen and path.is_file():
            seen.add(path)
            out.append(path)
    return out, refused


def referenced_files(dicomdir: str | Path) -> list[Path]:
    """Existing files referenced by a DICOMDIR's records, inside its folder only."""
    return dicomdir_references(dicomdir)[0]


def is_dicomdir_path(path: str | Path) -> bool:
    name = Path(path).name.upper()
    return name == "DICOMDIR" or name.startswith("DICOMDIR")


def expand_dicomdirs(sources: Iterable[SourceFile]) -> Iterator[SourceFile]:
    """Every source, plus the files each DICOMDIR among them references (once each)."""
    sources = list(sources)
    seen = {s.path for s in sources}
    for source in sources:
        yield source
        if source.kind != "dicom" or not is_dicomdir_path(source.path):
            continue
        paths, refused = dicomdir_references(source.path)
        for number, reason in refused:
            yield RefusedSource(f"{source.path}#{number}", source.size, source.mtime_ns,
                                "refused", reason)
        for path in paths:
            key = str(path.absolute())
            if key in seen:
                continue
            seen.add(key)
            st = path.stat()
            yield SourceFile(key, st.st_size, st.st_mtime_ns, "dicom")
