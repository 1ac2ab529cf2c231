"""Following a DICOMDIR (media directory) to the files it references.

A DICOMDIR holds no image itself; its records name files by ReferencedFileID relative to the
DICOMDIR's folder. Those files often have no suffix and sometimes no preamble, so walking the
folder alone can miss them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Iterator

import pydicom

from .sources import SourceFile


def referenced_files(dicomdir: str | Path) -> list[Path]:
    """Existing files referenced by a DICOMDIR's records (unreadable directory → none)."""
    dicomdir = Path(dicomdir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(dicomdir, force=True, specific_tags=["DirectoryRecordSequence"])
        records = ds.get("DirectoryRecordSequence") or []
    except Exception:
        return []
    out, seen = [], set()
    for record in records:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        path = dicomdir.parent.joinpath(*[str(p).strip() for p in parts])
        if path not in seen and path.is_file():
            seen.add(path)
            out.append(path)
    return out


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
        for path in referenced_files(source.path):
            key = str(path.absolute())
            if key in seen:
                continue
            seen.add(key)
            st = path.stat()
            yield SourceFile(key, st.st_size, st.st_mtime_ns, "dicom")
