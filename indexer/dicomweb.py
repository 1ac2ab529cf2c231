"""A PACS as a source: find instances with QIDO-RS, fetch each with WADO-RS (dicomweb-client).

A source is written ``dicomweb+http://HOST:PORT/dicom-web`` (or ``dicomweb+https://``). Each
instance becomes a :class:`SourceFile` whose path is its WADO-RS address
``<source>/studies/<study>/series/<series>/instances/<sop>``; size and mtime are 0, so an
instance already in the store counts as unchanged and is never fetched again (incremental by
SOP Instance UID). Fetching happens in the decode workers, in parallel.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from datetime import date

import pydicom

from .images import DecodeError
from .sources import SourceFile

PREFIX = "dicomweb+"
_PATH = re.compile(r"^(?P<root>dicomweb\+https?://.+?)/studies/(?P<study>[0-9.]+)"
                   r"/series/(?P<series>[0-9.]+)/instances/(?P<sop>[0-9.]+)$")
#: Ask for the stored transfer syntax: no lossy or lossless transcoding by the server.
MEDIA_TYPES = (("application/dicom", "*"),)
#: QIDO page size; dicomweb-client follows the pages.
PAGE = 500


@dataclass(frozen=True)
class DicomWebQuery:
    """What to take from a PACS: all instances, or those of a study, a modality, since a date."""

    study: str | None = None
    modality: str | None = None
    since: str | None = None  # YYYY-MM-DD or YYYYMMDD

    @property
    def filtered(self) -> bool:
        return bool(self.study or self.modality or self.since)

    def search_filters(self) -> dict:
        filters = {}
        if self.modality:
            filters["Modality"] = self.modality.upper()
        if self.since:
            filters["StudyDate"] = f"{dicom_date(self.since)}-"
        return filters


def dicom_date(text: str) -> str:
    """YYYY-MM-DD or YYYYMMDD → YYYYMMDD, or a clear error."""
    raw = text.strip().replace("-", "")
    try:
        date(int(raw[:4]), int(raw[4:6]), int(raw[6:8]))
        if len(raw) != 8:
            raise ValueError
    except ValueError:
        raise ValueError(f"the 'since' date must be like 2024-01-31, got {text!r}") from None
    return raw


def is_dicomweb(root: str) -> bool:
    return str(root).startswith((PREFIX + "http://", PREFIX + "https://"))


def base_url(root: str) -> str:
    return root[len(PREFIX):].rstrip("/")


def client(root: str):
    from dicomweb_client.api import DICOMwebClient

    web = DICOMwebClient(url=base_url(root), timeout=60)
    # transient 429/503/504 answers are retried briefly; a dead server fails within seconds
    web.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
    return web


def _uid(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def list_instances(root: str, query: DicomWebQuery | None = None) -> list[SourceFile]:
    """Every instance the server lists for the query, as sources to index."""
    query = query or DicomWebQuery()
    root = root.rstrip("/")
    try:
        found = client(root).search_for_instances(
            study_instance_uid=query.study or None, search_filters=query.search_filters(),
            fields=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
            limit=PAGE, get_remaining=True)
    except Exception as exc:  # requests raises many types; all mean "the server did not answer"
        raise ConnectionError(f"DICOMweb search at {base_url(root)} failed: {exc}") from None
    sources = []
    for item in found:
        study, series, sop = (_uid(item, "0020000D"), _uid(item, "0020000E"),
                              _uid(item, "00080018"))
        if study and series and sop:
            sources.append(SourceFile(f"{root}/studies/{study}/series/{series}/instances/{sop}",
                                      0, 0, "dicomweb"))
    return sorted(sources, key=lambda s: s.path)


def retrieve_instance(path: str) -> bytes:
    """Fetch one instance (WADO-RS, stored transfer syntax) as Part-10 bytes."""
    match = _PATH.match(path)
    if not match:
        raise DecodeError(f"not a DICOMweb instance address: {path}")
    try:
        ds = client(match["root"]).retrieve_instance(match["study"], match["series"], match["sop"],
                                                     media_types=MEDIA_TYPES)
    except Exception as exc:
        raise DecodeError(f"WADO-RS retrieval failed: {exc}") from None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=False)
    return buffer.getvalue()


def removal_allowed(path: str, query: DicomWebQuery | None) -> bool:
    """A filtered query lists only part of a server: unlisted instances are not deleted ones."""
    return not (is_dicomweb(path) and query is not None and query.filtered)
