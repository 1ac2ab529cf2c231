"""The receiver's spool: instances a modality or PACS sent us, kept durably until indexed.

An instance is acknowledged only once :meth:`Spool.put` returned: its bytes are in an
owner-only file, fsync'd, renamed into place and the rename fsync'd. A kill before that leaves
at most a ``.part`` file (never acknowledged, removed at the next start); a kill after it
leaves the file, which the next start indexes. Files are named by arrival time, so two
versions of one instance are indexed in the order they came; the indexer removes a file only
after the batch holding it is committed (a file indexed but not yet removed is seen again as
unchanged: nothing is duplicated).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .sources import SourceFile

#: The store path of a received instance: it is identified by its SOP Instance UID alone, so
#: the same instance sent twice (by two modalities, or again after a kill) is one source.
PREFIX = "received://"
PART = ".part"


@dataclass(frozen=True)
class SpooledInstance(SourceFile):
    """A received instance waiting in the spool; ``spool`` is its file there."""

    spool: str = ""


def received_path(sop_uid: str) -> str:
    return PREFIX + quote(sop_uid.strip(), safe="")


class Spool:
    """A folder of received instances inside the store folder (mode 0700)."""

    def __init__(self, folder: str | Path, *, min_free_bytes: int = 256 << 20) -> None:
        self.folder = Path(folder)
        self.min_free_bytes = min_free_bytes
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)  # an existing folder too: received data is PHI
        for partial in self.folder.glob(f"*{PART}"):  # never acknowledged
            partial.unlink(missing_ok=True)

    def has_room(self) -> bool:
        """Whether the disk keeps ``min_free_bytes`` free: below it, senders are told to
        retry later (Out of Resources) rather than filling the disk the store needs."""
        return shutil.disk_usage(self.folder).free >= self.min_free_bytes

    def put(self, data: bytes) -> Path:
        """Store one instance (Part-10 bytes) durably; only after this returns may it be
        acknowledged.
        Raises OSError (e.g. ENOSPC) with nothing left behind."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        part, final = self.folder / (name + PART), self.folder / (name + ".dcm")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(part, final)
        self._sync_folder()
        return final

    def pending(self, limit: int | None = None) -> list[Path]:
        """Spooled instances in arrival order (oldest first)."""
        files = sorted(self.folder.glob("*.dcm"))
        return files[:limit] if limit else files

    def remove(self, files: list[Path]) -> None:
        """Drop instances whose batch is committed."""
        for path in files:
            path.unlink(missing_ok=True)
        if files:
            self._sync_folder()

    def _sync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def spooled_source(path: Path) -> SpooledInstance:
    """The source a spool file stands for: ``received://<SOP Instance UID>`` (read from its
    File Meta; an unreadable one is named by its spool file and fails with a reason)."""
    from pydicom.filereader import read_file_meta_info

    try:
        sop = str(read_file_meta_info(path).get("MediaStorageSOPInstanceUID", "") or "").strip()
    except Exception:  # a damaged header: decoding will say what is wrong
        sop = ""
    uid = sop or f"unreadable-{path.stem}"
    return SpooledInstance(received_path(uid), path.stat().st_size, 0, "received", str(path))
