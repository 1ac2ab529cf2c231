"""A PACS over DICOMweb: find instances with QIDO-RS (dicomweb-client), fetch each with WADO-RS
as the bytes the server stores.

A source is written ``dicomweb+http://HOST:PORT/dicom-web`` (or ``dicomweb+https://``). Each
instance's path is its WADO-RS address ``<source>/studies/<study>/series/<series>/instances/<sop>``
with every UID percent-encoded, so any UID a PACS lists (even one that is not a plain dotted
number) is usable. Retrieval asks for the stored transfer syntax and hands the part's bytes,
unparsed, to the decode entry: a file without File Meta, in an odd encoding or truncated reads
exactly as it would from disk, and fails with the same reason.
"""

from __future__ import annotations

import email.parser
import email.policy
from functools import lru_cache

from .images import DecodeError
from .pacs import PacsAccess, PacsQuery, dicom_date, instance_path, split_instance_path
from .sources import SourceFile

PREFIX = "dicomweb+"
#: The stored transfer syntax, as it is: no lossy or lossless transcoding by the server.
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
#: QIDO page size; dicomweb-client follows the pages.
PAGE = 500


def base_url(root: str) -> str:
    return root[len(PREFIX):].rstrip("/")


@lru_cache(maxsize=8)
def _session(access: PacsAccess):
    """One HTTP session per process and access: connection reuse, the PACS's credentials,
    brief retries of transient 429/502/503/504 answers."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    retry = Retry(total=3, backoff_factor=0.25, status_forcelist=(429, 502, 503, 504),
                  allowed_methods=("GET",))
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    if access.token:
        session.headers["Authorization"] = f"Bearer {access.token}"
    elif access.user:
        session.auth = (access.user, access.password or "")
    if access.tls_ca:
        session.verify = access.tls_ca
    if access.tls_cert:
        session.cert = (access.tls_cert, access.tls_key)
    return session


def client(root: str, access: PacsAccess | None = None):
    from dicomweb_client.api import DICOMwebClient

    access = access or PacsAccess()
    return DICOMwebClient(url=base_url(root), session=_session(access),
                          timeout=access.timeout_s, permissive_uid=True)


def _uid(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]).strip() if values else None


def search_filters(query: PacsQuery) -> dict:
    filters = {}
    if query.modality:
        filters["Modality"] = query.modality.upper()
    if query.since:
        filters["StudyDate"] = f"{dicom_date(query.since)}-"
    return filters


def list_instances(root: str, query: PacsQuery | None = None,
                   access: PacsAccess | None = None) -> list[SourceFile]:
    """Every instance the server lists for the query, as sources to index."""
    query = query or PacsQuery()
    root = root.rstrip("/")
    try:
        found = client(root, access).search_for_instances(
            study_instance_uid=query.study or None, search_filters=search_filters(query),
            fields=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
            limit=PAGE, get_remaining=True)
    except Exception as exc:  # requests raises many types; all mean "the server did not answer"
        raise ConnectionError(f"DICOMweb search at {base_url(root)} failed: {exc}") from None
    sources = []
    for item in found:
        study, series, sop = (_uid(item, "0020000D"), _uid(item, "0020000E"),
                              _uid(item, "00080018"))
        if study and series and sop:
            sources.append(SourceFile(instance_path(root, study, series, sop), 0, 0, "dicomweb"))
    return sorted(sources, key=lambda s: s.path)


def retrieve_instance(path: str, access: PacsAccess | None = None) -> bytes:
    """Fetch one instance (WADO-RS, stored transfer syntax) as the bytes the server holds."""
    try:
        root = split_instance_path(path)[0]
    except ValueError as exc:
        raise DecodeError(str(exc)) from None
    url = base_url(root) + path[len(root):]  # the UIDs stay encoded
    access = access or PacsAccess()
    try:
        reply = _session(access).get(url, headers={"Accept": ACCEPT}, timeout=access.timeout_s)
    except Exception as exc:  # connection refused, reset, timed out, TLS …
        raise DecodeError(f"WADO-RS retrieval failed: {type(exc).__name__}: {exc}") from None
    if reply.status_code != 200:
        raise DecodeError(f"WADO-RS retrieval failed: HTTP {reply.status_code} {reply.reason} "
                          f"from {base_url(root)}")
    return first_part(reply.headers.get("Content-Type", ""), reply.content)


def first_part(content_type: str, body: bytes) -> bytes:
    """The first body part of a multipart/related answer (some servers send the one part
    bare, as application/dicom: accepted too)."""
    if content_type.lower().startswith("application/dicom"):
        return body
    if not content_type.lower().startswith("multipart/"):
        raise DecodeError(f"WADO-RS retrieval failed: the server answered {content_type or 'no type'}"
                          ", not multipart/related DICOM")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    for part in message.iter_parts():
        data = part.get_payload(decode=True)
        if data:
            return data
    raise DecodeError("WADO-RS retrieval failed: the answer held no DICOM part")
