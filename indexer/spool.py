"""The receiver's spool: instances a modality or PACS sent us, kept durably until indexed.

An instance is acknowledged only once :meth:`Spool.put` returned: its bytes are in an
owner-only file, fsync'd, renamed into place and the rename fsync'd. A kill before that leaves
at most a temp file (never acknowledged, removed at the next start); a kill after it
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

from retrieval.store.layout import DIR_MODE, atomic_write_bytes, fsync_dir

from .sources import SourceFile

#: The store path of a received instance: it is identified by its SOP Instance UID alone, so
#: the same instance sent twice (by two modalities, or again after a kill) is one source.
PREFIX = "received://"
PART = ".tmp"  # retrieval.store.layout.temp_name's suffix


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
        self.folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.folder, DIR_MODE)  # an existing folder too: received data is PHI
        for partial in self.folder.glob(f"*.dcm.*{PART}"):  # never acknowledged
            partial.unlink(missing_ok=True)

    def has_room(self) -> bool:
        """Whether the disk keeps ``min_free_bytes`` free: below it, senders are told to
        retry later (Out of Resources) rather than filling the disk the store needs."""
        return shutil.disk_usage(self.folder).free >= self.min_free_bytes

    def put(self, data: bytes) -> Path:
        """Store one instance (Part-10 bytes) durably; only after this returns may it be
        acknowledged. Raises StoreError (e.g. a full disk) with nothing left behind."""
        final = self.folder / f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.dcm"
        atomic_write_bytes(final, data)  # owner-only temp, fsync, rename, folder fsync
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
            fsync_dir(self.folder)


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
