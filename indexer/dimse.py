"""A PACS over the DICOM network protocol (DIMSE, pynetdicom): C-FIND lists, C-GET fetches.

A source is written ``dimse://AET@HOST:PORT`` (AET: the PACS's called AE title; we call as
:attr:`PacsAccess.calling_aet`, which the PACS must know). Listing walks the Study Root model
(studies, then their series, then their images) on one association; each instance's path is
``<source>/studies/<study>/series/<series>/instances/<sop>`` (UIDs percent-encoded), so runs
are incremental by SOP Instance UID as with DICOMweb. A decode worker fetches one instance per
association with C-GET, offering its SOP class in every transfer syntax so the PACS sends it
as stored; the bytes received go to the same decode entry as a file on disk.

Association failures, refusals, failure statuses and timeouts become reasons: a listing that
fails outright is a ``ConnectionError`` (the run reports it and goes on with other sources), a
study or series that cannot be listed is a problem of the listing (nothing of that PACS is then
removed), an instance that cannot be fetched is a failed source.
"""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from functools import lru_cache

from .images import DecodeError
from .pacs import PacsAccess, PacsQuery, dicom_date, instance_path, split_instance_path
from .sources import SourceFile

_ROOT = re.compile(r"^dimse://(?P<aet>[^@/]{1,16})@(?P<host>\[[0-9a-fA-F:.]+\]|[^:/@\[\]]+)"
                   r":(?P<port>[0-9]{1,5})$")
#: DIMSE statuses a C-FIND or C-GET reports while it is still sending results
PENDING = (0xFF00, 0xFF01)

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # failures are reported as reasons


@dataclass(frozen=True)
class DimseInstance(SourceFile):
    """An instance on a DIMSE PACS; the SOP class (from C-FIND) says which storage context
    the C-GET must offer."""

    sop_class: str = ""


@dataclass(frozen=True)
class Peer:
    """A PACS's DICOM address."""

    aet: str
    host: str
    port: int

    @classmethod
    def of(cls, root: str) -> "Peer":
        match = _ROOT.match(root.rstrip("/"))
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"not a DIMSE address: {root!r}; write dimse://AET@HOST:PORT, "
                             "e.g. dimse://ORTHANC@pacs.example.org:4242")
        return cls(match["aet"], match["host"].strip("[]"), int(match["port"]))

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def _tls(access: PacsAccess, host: str) -> tuple[ssl.SSLContext, str] | None:
    return (_tls_context(access), host) if access.tls else None


@lru_cache(maxsize=8)
def _tls_context(access: PacsAccess) -> ssl.SSLContext:
    """One context per access (its CA and key files read once, not per fetched instance)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=access.tls_ca)
    if access.tls_cert:
        context.load_cert_chain(access.tls_cert, access.tls_key)
    return context


def _application(access: PacsAccess):
    from pynetdicom import AE

    ae = AE(ae_title=access.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = access.timeout_s
    ae.connection_timeout = access.timeout_s
    return ae


def _associate(ae, peer: Peer, access: PacsAccess, what: str, **kwargs):
    """An established association, or a ``ConnectionError`` that says what happened."""
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.aet,
                             tls_args=_tls(access, peer.host), **kwargs)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConnectionError(f"DIMSE {what} with {peer} failed: {exc}") from None
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        why = "the PACS rejected the association (is our AE title "
        why += f"{access.calling_aet!r} configured on the PACS, and its own {peer.aet!r} right?)"
    elif assoc.is_aborted:
        why = (f"the association was aborted: no answer within {access.timeout_s:g} s, or the "
               "PACS requires TLS (--tls), or it refused what we asked for")
    else:
        why = f"no answer within {access.timeout_s:g} s (connection refused or timed out)"
    raise ConnectionError(f"DIMSE {what} with {peer} failed: {why}")


def _find(assoc, peer: Peer, calling_aet: str, identifier) -> list:
    """The identifiers a C-FIND answers with; a failure status is a ``ConnectionError``."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    found = []
    for status, answer in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        code = getattr(status, "Status", None)
        if code is None:  # no status: the association ended (timeout, abort)
            raise ConnectionError(f"C-FIND at {peer} got no valid answer: the PACS refused "
                                  f"the query (may our AE title {calling_aet!r} query it?), "
                                  "aborted, or timed out")
        if code in PENDING:
            if answer is not None:
                found.append(answer)
        elif code != 0x0000:
            raise ConnectionError(f"C-FIND at {peer} failed with status 0x{code:04X}")
    return found


def _query(level: str, **keys):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _text(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def list_instances(root: str, query: PacsQuery | None = None,
                   access: PacsAccess | None = None) -> tuple[list[SourceFile], list[str]]:
    """(every instance the PACS lists for the query, the problems of the listing)."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    query, access = query or PacsQuery(), access or PacsAccess()
    root = root.rstrip("/")
    try:
        peer = Peer.of(root)
    except ValueError as exc:
        raise ConnectionError(str(exc)) from None
    ae = _application(access)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, peer, access, "query")
    sources: list[SourceFile] = []
    problems: list[str] = []
    try:
        studies = _find(assoc, peer, access.calling_aet, _query(
            "STUDY", StudyInstanceUID=query.study or "",
            StudyDate=f"{dicom_date(query.since)}-" if query.since else "",
            ModalitiesInStudy=query.modality.upper() if query.modality else ""))
        for study in sorted({_text(s, "StudyInstanceUID") for s in studies} - {""}):
            try:
                series = _find(assoc, peer, access.calling_aet, _query(
                    "SERIES", StudyInstanceUID=study, SeriesInstanceUID="",
                    Modality=query.modality.upper() if query.modality else ""))
                for series_uid in sorted({_text(s, "SeriesInstanceUID") for s in series} - {""}):
                    images = _find(assoc, peer, access.calling_aet, _query(
                        "IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series_uid,
                        SOPInstanceUID="", SOPClassUID=""))
                    for image in images:
                        sop = _text(image, "SOPInstanceUID")
                        if sop:
                            sources.append(DimseInstance(
                                instance_path(root, study, series_uid, sop), 0, 0, "dimse",
                                _text(image, "SOPClassUID")))
            except ConnectionError as exc:
                problems.append(f"study {study}: {exc}")
                if not assoc.is_established:  # the PACS went away: the rest cannot be listed
                    assoc = _associate(ae, peer, access, "query")
    finally:
        if assoc.is_established:
            assoc.release()
    unique = {s.path: s for s in sources}
    return sorted(unique.values(), key=lambda s: s.path), problems


def _storage_contexts(sop_class: str):
    """One context per transfer syntax: the PACS accepts those it can send and picks the
    one the instance is stored in."""
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import build_context, build_role

    from .dicom_frames import NEWER_SYNTAXES  # offered too: the PACS sends such files as stored

    syntaxes = list(dict.fromkeys([*AllTransferSyntaxes, *NEWER_SYNTAXES]))
    contexts = [build_context(sop_class, [syntax]) for syntax in syntaxes[:126]]
    return contexts, [build_role(sop_class, scp_role=True)]


def _sop_class(ae, peer: Peer, access: PacsAccess, study: str, series: str, sop: str) -> str:
    """An instance's SOP class, asked with C-FIND when the listing did not say."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, peer, access, "query")
    try:
        found = _find(assoc, peer, access.calling_aet, _query("IMAGE", StudyInstanceUID=study,
                                          SeriesInstanceUID=series, SOPInstanceUID=sop,
                                          SOPClassUID=""))
    finally:
        if assoc.is_established:
            assoc.release()
    classes = [_text(f, "SOPClassUID") for f in found if _text(f, "SOPClassUID")]
    if not classes:
        raise DecodeError(f"C-FIND at {peer} does not list instance {sop} (deleted since?)")
    return classes[0]


def retrieve_instance(path: str, access: PacsAccess | None = None,
                      sop_class: str = "") -> bytes:
    """One instance as Part-10 bytes (the dataset as the PACS sent it, File Meta from the
    association), fetched with C-GET on an association of its own."""
    from pynetdicom import evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    access = access or PacsAccess()
    try:
        root, study, series, sop = split_instance_path(path)
    except ValueError as exc:
        raise DecodeError(str(exc)) from None
    try:
        peer = Peer.of(root)
        if not sop_class:
            sop_class = _sop_class(_application(access), peer, access, study, series, sop)
        received: list[bytes] = []

        def on_store(event) -> int:
            if str(event.request.AffectedSOPInstanceUID or "").strip() != sop:
                return 0xA900  # not what was asked for: "does not match SOP class" family
            received.append(event.encoded_dataset())
            return 0x0000

        ae = _application(access)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        contexts, roles = _storage_contexts(sop_class)
        for context in contexts:
            ae.add_requested_context(context.abstract_syntax, context.transfer_syntax)
        assoc = _associate(ae, peer, access, "retrieval", ext_neg=roles,
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])
        final = None
        try:
            for status, _ in assoc.send_c_get(
                    _query("IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series,
                           SOPInstanceUID=sop), StudyRootQueryRetrieveInformationModelGet):
                final = getattr(status, "Status", None)
        finally:
            if assoc.is_established:
                assoc.release()
    except ConnectionError as exc:
        raise DecodeError(str(exc)) from None
    if received:
        return received[0]
    if final is None:
        raise DecodeError(f"C-GET of {sop} from {peer} got no answer (timeout or abort)")
    raise DecodeError(f"C-GET of {sop} from {peer} sent no instance (status 0x{final:04X}: "
                      "not on the PACS any more, or in a transfer syntax it could not send)")
