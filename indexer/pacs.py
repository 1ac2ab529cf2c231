"""A PACS as a source, whatever protocol it speaks: what to take from it (:class:`PacsQuery`),
how to reach it (:class:`PacsAccess`: credentials, TLS, the calling AE title), and the two
operations every protocol module implements — list the instances, fetch one as Part-10 bytes.

DICOMweb (:mod:`indexer.dicomweb`) and DIMSE (:mod:`indexer.dimse`) sources are both written
as addresses (``dicomweb+http://…``, ``dimse://AET@HOST:PORT``); each instance becomes a
:class:`SourceFile` whose path names it on that PACS, with size and mtime 0 so that an instance
already in the store counts as unchanged and is never fetched again (incremental by SOP
Instance UID). The bytes fetched go through the same decode entry as a file on disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import quote, unquote

from .sources import SourceFile

DICOMWEB_PREFIXES = ("dicomweb+http://", "dicomweb+https://")
DIMSE_PREFIX = "dimse://"
#: source kinds whose bytes are fetched from a PACS in the decode worker
PACS_KINDS = ("dicomweb", "dimse")
_INSTANCE = re.compile(r"^(?P<root>.+?)/studies/(?P<study>[^/]+)"
                       r"/series/(?P<series>[^/]+)/instances/(?P<sop>[^/]+)$")


@dataclass(frozen=True)
class PacsQuery:
    """What to take from a PACS: all instances, or those of a study, a modality, since a date."""

    study: str | None = None
    modality: str | None = None
    since: str | None = None  # YYYY-MM-DD or YYYYMMDD

    @property
    def filtered(self) -> bool:
        return bool(self.study or self.modality or self.since)


@dataclass(frozen=True)
class PacsAccess:
    """How to reach a PACS; picklable, travels to the decode workers. Secrets never appear
    in ``repr`` (logs, tracebacks)."""

    calling_aet: str = "MEDSEARCH"          # DIMSE: our AE title
    timeout_s: float = 30.0                 # one network step (connect, a response)
    token: str | None = field(default=None, repr=False)     # DICOMweb: bearer token
    user: str | None = None                 # DICOMweb: HTTP basic user
    password: str | None = field(default=None, repr=False)  # DICOMweb: HTTP basic password
    tls_ca: str | None = None               # CA bundle to verify the PACS (https and DIMSE TLS)
    tls_cert: str | None = None             # our client certificate (mutual TLS)
    tls_key: str | None = None              # its private key
    tls: bool = False                       # DIMSE over TLS (DICOMweb: the URL's https says)

    def __post_init__(self) -> None:
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value and not Path(value).expanduser().is_file():
                raise ValueError(f"{name.replace('_', '-')} {value}: no such file")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("a client certificate needs its key: give both --tls-cert and "
                             "--tls-key, or neither")
        if self.password and not self.user:
            raise ValueError("a PACS password needs a user (pacs_user)")
        if not valid_aet(self.calling_aet):
            raise ValueError("calling AE title must be 1-16 ASCII characters, got "
                             f"{self.calling_aet!r}")


def valid_aet(title: str) -> bool:
    """A DICOM AE title: 1-16 ASCII characters, not all spaces, no backslash."""
    return bool(title and title.strip()) and len(title) <= 16 and title.isascii() \
        and "\\" not in title


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


def is_pacs(root: str) -> bool:
    return str(root).startswith((*DICOMWEB_PREFIXES, DIMSE_PREFIX))


def pacs_kind(path: str) -> str | None:
    """The source kind of a PACS address ("dicomweb" or "dimse"; None: not a PACS)."""
    if str(path).startswith(DIMSE_PREFIX):
        return "dimse"
    return "dicomweb" if str(path).startswith(DICOMWEB_PREFIXES) else None


def instance_path(root: str, study: str, series: str, sop: str) -> str:
    """An instance's stored path, ``<source>/studies/…/series/…/instances/…``, every UID
    percent-encoded (a plain dotted UID is unchanged, so stores made before keep their paths;
    any UID a PACS lists is usable in an address)."""
    return (f"{root}/studies/{quote(study, safe='')}/series/{quote(series, safe='')}"
            f"/instances/{quote(sop, safe='')}")


def split_instance_path(path: str) -> tuple[str, str, str, str]:
    """(root, study, series, sop) of an instance path, the UIDs decoded (``ValueError``: not
    one)."""
    match = _INSTANCE.match(path)
    if not match or pacs_kind(match["root"]) is None:
        raise ValueError(f"not a PACS instance address: {path}")
    return match["root"], unquote(match["study"]), unquote(match["series"]), unquote(match["sop"])


def list_sources(root: str, query: PacsQuery | None,
                 access: PacsAccess) -> tuple[list[SourceFile], list[str]]:
    """(every instance the PACS at ``root`` lists for the query, as sources to index; what
    could not be listed, e.g. one study); a ``ConnectionError`` (with what happened) when it
    cannot be listed at all."""
    if root.startswith(DIMSE_PREFIX):
        from .dimse import list_instances as list_dimse

        return list_dimse(root, query or PacsQuery(), access)
    from .dicomweb import list_instances

    return list_instances(root, query or PacsQuery(), access), []


def fetch(source: SourceFile, access: PacsAccess) -> bytes:
    """One instance's Part-10 bytes as the PACS stores them (``DecodeError`` on failure)."""
    if source.kind == "dimse":
        from .dimse import retrieve_instance as retrieve_dimse

        return retrieve_dimse(source.path, access, getattr(source, "sop_class", ""))
    from .dicomweb import retrieve_instance

    return retrieve_instance(source.path, access)


def removal_allowed(path: str, query: PacsQuery | None) -> bool:
    """A filtered query lists only part of a server: unlisted instances are not deleted ones."""
    return not (is_pacs(path) and query is not None and query.filtered)
