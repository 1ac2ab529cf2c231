"""Finding what to index: walk folders and files, recognise images and DICOM by name or bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
#: Never image data: skipped without reading, so a folder of reports costs nothing.
_NEVER_IMAGES = {".txt", ".json", ".csv", ".xml", ".html", ".md", ".pdf", ".zip", ".gz",
                 ".py", ".log", ".ini", ".yaml", ".yml", ".sqlite", ".faiss", ".npy"}


@dataclass(frozen=True)
class SourceFile:
    """A file to consider, with what incremental indexing compares."""

    path: str       # absolute, as stored
    size: int
    mtime_ns: int
    kind: str       # "image" | "dicom"


def has_dicom_preamble(path: str | Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def classify(path: Path) -> str | None:
    """'image', 'dicom' or None (not something we index)."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if path.name == "DICOMDIR" or suffix in _NEVER_IMAGES or path.name.startswith("."):
        return "dicom" if path.name == "DICOMDIR" else None
    return "dicom" if has_dicom_preamble(path) else None


def _entry(path: Path, kind: str) -> SourceFile | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return SourceFile(str(path), st.st_size, st.st_mtime_ns, kind)


def walk(roots: Iterable[str | Path]) -> Iterator[SourceFile]:
    """Every indexable file under ``roots`` (files given directly are always considered)."""
    seen: set[str] = set()
    for root in roots:
        root = Path(root).expanduser().absolute()
        if root.is_file():
            kind = classify(root) or "image"  # named explicitly: try it, report if it fails
            entry = _entry(root, kind)
            if entry and entry.path not in seen:
                seen.add(entry.path)
                yield entry
            continue
        for folder, dirs, files in os.walk(root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(folder) / name
                kind = classify(path)
                if kind is None:
                    continue
                entry = _entry(path, kind)
                if entry and entry.path not in seen:
                    seen.add(entry.path)
                    yield entry

