"""The application's two decoders, an upload's bytes and an indexed row's source → model input,
both through the indexer's one decode entry with the store's recorded decode settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.errors import InputError, NotFoundError

if TYPE_CHECKING:  # the command line sniffs an upload before it knows it needs numpy
    import numpy as np


def sniff(data: bytes) -> str | None:
    """What an upload is, by its first bytes (never by its name): png, jpeg, dicom or None.
    The server accepts only these; the command line asks it only for a file it accepts."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    from indexer.sources import content_kind  # DICOM, with or without its preamble

    return "dicom" if content_kind(data) == "dicom" else None


def decode_upload(content: bytes, kind: str, size: int, decode: dict | None = None,
                  region=None) -> np.ndarray:
    """An uploaded file's bytes → model input, decoded from memory exactly as the indexer
    decodes the store's files (``decode``: its manifest's record; a query is one picture, so
    its middle frame), but in a child process with memory and time limits: a crafted upload
    costs a 422, never the server. ``kind`` was sniffed from the same bytes."""
    from indexer.view import UPLOAD_NAME, DecodeSettings, read_image

    settings = DecodeSettings.from_manifest(decode).for_query()
    try:
        return read_image(content, image_size=size, settings=settings, isolated=True,
                          region=region).tensor
    except InputError as exc:  # the server says "the uploaded … could not be decoded: …"
        raise InputError(str(exc).removeprefix(f"{UPLOAD_NAME}: ")) from None


def decode_stored(path: str, frame: int, size: int, decode: dict | None = None,
                  region=None, pacs=None) -> np.ndarray:
    """An indexed source's frame → model input (for previews), decoded with the settings the
    store recorded (``decode``: its manifest's); the path comes from the store (a PACS
    instance is fetched again: ``pacs``, an ``indexer.pacs.PacsAccess``, says how)."""
    from indexer.view import read_stored

    try:
        return read_stored(path, frame, image_size=size, decode=decode, region=region,
                           pacs=pacs).tensor
    except NotFoundError as exc:  # gone: say so, not "cannot decode"
        raise InputError(str(exc).removeprefix(f"{path}: ")) from None
    except InputError as exc:
        raise InputError(f"cannot decode it again: {str(exc).removeprefix(f'{path}: ')}") from None


def pacs_access(settings):
    """How this process reaches a PACS (``indexer.pacs.PacsAccess``), from the settings."""
    from indexer.pacs import PacsAccess

    try:
        return PacsAccess(calling_aet=settings.pacs_calling_aet, timeout_s=settings.pacs_timeout,
                          token=settings.pacs_token, user=settings.pacs_user,
                          password=settings.pacs_password, tls=settings.pacs_tls,
                          tls_ca=settings.pacs_tls_ca, tls_cert=settings.pacs_tls_cert,
                          tls_key=settings.pacs_tls_key)
    except ValueError as exc:
        raise InputError(f"{exc} (PACS settings)") from None
