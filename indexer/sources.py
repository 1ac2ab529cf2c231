"""Finding what to index: walk folders and files, recognise images and DICOM by name or bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from retrieval.query import DICOM_SUFFIXES, IMAGE_SUFFIXES

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


def content_kind(data: bytes) -> str:
    """'dicom' or 'image' for a file's bytes (an upload has no name to go by)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    # DICOM without preamble: a little-endian group 0002 or 0008 element first
    if len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[3:4] == b"\x00":
        return "dicom"
    return "image"


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


def under_any(path: str, roots: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``roots`` or lies below one."""
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


@dataclass
class WalkProblem:
    """Something the walk could not read: a folder (``root`` is then unsafe to prune) or a
    file whose stat failed (kept in the store as it is, never treated as deleted)."""

    root: str
    path: str
    reason: str

    def to_json(self) -> dict:
        return {"root": self.root, "path": self.path, "reason": self.reason}


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


class Walker:
    """Walks roots and remembers what it could not read, so that the caller never takes an
    unreadable folder (an unmounted share, a permission error) for deleted files.

    After :meth:`walk` is exhausted: ``unsafe`` maps each root that must not be pruned to
    why (nothing found, unreadable, errors during the walk); ``unreadable_files`` lists files
    whose stat failed (keep them); ``problems`` has every fault, for the report.
    """

    def __init__(self) -> None:
        self.unsafe: dict[str, str] = {}
        self.unreadable_files: list[str] = []
        self.problems: list[WalkProblem] = []

    def _entry(self, root: str, path: Path, kind: str) -> SourceFile | None:
        try:
            st = path.stat()
        except OSError as exc:
            self.unreadable_files.append(str(path))
            self.problems.append(WalkProblem(root, str(path), f"cannot stat: {_reason(exc)}"))
            return None
        return SourceFile(str(path), st.st_size, st.st_mtime_ns, kind)

    def walk(self, roots: Iterable[str | Path]) -> Iterator[SourceFile]:
        """Every indexable file under ``roots`` (files given directly are always considered)."""
        seen: set[str] = set()
        for root in roots:
            root = Path(root).expanduser().absolute()
            key, found = str(root), 0
            if root.is_file():
                kind = classify(root) or "image"  # named explicitly: try it, report if it fails
                entry = self._entry(key, root, kind)
                if entry and entry.path not in seen:
                    seen.add(entry.path)
                    yield entry
                continue
            errors: list[OSError] = []
            for folder, dirs, files in os.walk(root, onerror=errors.append, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    path = Path(folder) / name
                    kind = classify(path)
                    if kind is None:
                        continue
                    found += 1
                    entry = self._entry(key, path, kind)
                    if entry and entry.path not in seen:
                        seen.add(entry.path)
                        yield entry
            for exc in errors:
                self.problems.append(WalkProblem(key, str(exc.filename or root),
                                                 f"cannot read folder: {_reason(exc)}"))
            at_root = [e for e in errors if os.fspath(e.filename or "") == key]
            if at_root:
                self.unsafe[key] = f"cannot read it ({_reason(at_root[0])}); is it mounted?"
            elif errors:
                self.unsafe[key] = (f"{len(errors)} folder(s) under it could not be read "
                                    f"(first: {errors[0].filename}: {_reason(errors[0])})")
            elif not found:
                self.unsafe[key] = ("no image files found under it (empty or not mounted?); "
                                    "to drop its entries use `medsearch remove`")


def walk(roots: Iterable[str | Path]) -> Iterator[SourceFile]:
    """Every indexable file under ``roots``, ignoring what cannot be read (see :class:`Walker`
    for a walk that reports it)."""
    return Walker().walk(roots)
