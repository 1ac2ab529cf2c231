"""DICOM objects read leniently and inspected (frames, pixel module, why there is no image),
and their PHI-safe metadata.

Reading is lenient (files without file meta or preamble, big endian, implicit VR) but never
silent: an object that cannot become an image raises :class:`DecodeError` (broken) or
:class:`NoImage` (valid, nothing to show), each with a reason a user can act on. Turning a
frame into display pixels is :mod:`indexer.dicom_frames`' job."""

from __future__ import annotations

import hashlib
import hmac
import io
import warnings
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (UID, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

from retrieval.store.schema import DICOM_FIELDS, PHI_POLICIES

from .images import DecodeError
from .limits import MAX_FRAMES, budget_reason, frame_reason

PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Above this, multi-frame files are read frame by frame from disk instead of into memory.
DEFER_BYTES = 16 * 1024 * 1024
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


class NoImage(Exception):
    """A valid DICOM object without pixels (SR, RT, presentation state …): skipped, not failed."""


# -- reading -------------------------------------------------------------------------------
def read_dataset(source: str | Path | bytes) -> Dataset:
    """Read a file (or the bytes of one) leniently; fill in a missing transfer syntax."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(source, (bytes, bytearray)):
                ds = pydicom.dcmread(io.BytesIO(source), force=True)
            else:
                ds = pydicom.dcmread(source, force=True, defer_size=DEFER_BYTES)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError,
            AttributeError, NotImplementedError) as exc:
        raise DecodeError(f"not a readable DICOM file: {exc}") from None
    if len(ds) == 0:
        raise DecodeError("not a DICOM file (no DICOM elements could be read; truncated?)")
    if "SOPClassUID" not in ds and not _has_pixels(ds) and not is_dicomdir(ds):
        raise DecodeError(f"incomplete DICOM object: {len(ds)} element(s), no SOP Class UID "
                          "and no pixel data (truncated, or a fragment rather than a file)")
    _infer_transfer_syntax(ds)
    return ds


def _infer_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta (or without its TransferSyntaxUID): use what the reader found."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = True, True
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _has_pixels(ds: Dataset) -> bool:
    return any(tag in ds for tag in PIXEL_TAGS)


def frame_count(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        count = 1 if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise DecodeError(f"invalid NumberOfFrames {str(value)!r} in the header") from None
    if count < 1:
        raise DecodeError(f"invalid NumberOfFrames {count} in the header")
    if count > MAX_FRAMES:
        raise DecodeError(f"invalid NumberOfFrames {count:,} in the header (more than "
                          f"{MAX_FRAMES:,}, indexer.limits.MAX_FRAMES)")
    return count


def transfer_syntax(ds: Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return getattr(uid, "name", str(uid)) if uid else "unknown transfer syntax"


def sop_class_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None),
                                           "MediaStorageSOPClassUID", None)
    return UID(str(uid)).name if uid else "unknown SOP class"


def is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    return ("DirectoryRecordSequence" in ds
            or str(getattr(meta, "MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY)


def no_image_reason(ds: Dataset) -> str | None:
    """Why a readable object has nothing to embed, or None when it has pixels."""
    if is_dicomdir(ds):
        return ("DICOMDIR (media directory): the image files it references are indexed "
                "on their own")
    if _has_pixels(ds):
        return None
    modality = str(ds.get("Modality", "") or "").strip() or "no modality"
    name = sop_class_name(ds)
    if "Image Storage" in name:
        return f"header only: {name} ({modality}) without pixel data"
    return f"no pixel data: {name} ({modality})"


def check_pixel_module(ds: Dataset, wanted: int = 1) -> None:
    """Pixel data is meaningless without the Image Pixel module's geometry, and dangerous with
    an absurd one: every field is checked, and the frame size and the decoding budget
    (:mod:`indexer.limits`) are decided from the header before any pixel is allocated."""
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:
        raise DecodeError(f"pixel data without {', '.join(missing)}: the Image Pixel module is "
                          "incomplete, so the pixels cannot be interpreted")
    rows, cols = _header_int(ds, "Rows", 1, 65535), _header_int(ds, "Columns", 1, 65535)
    samples = _header_int(ds, "SamplesPerPixel", 1, 4, default=1)
    if samples == 2:
        raise DecodeError("invalid SamplesPerPixel 2 in the header (must be 1, 3 or 4)")
    bits = _header_int(ds, "BitsAllocated", 1, 64)
    if bits != 1 and bits % 8:
        raise DecodeError(f"invalid BitsAllocated {bits} in the header (must be 1 or a "
                          "multiple of 8 up to 64)")
    reason = frame_reason(cols, rows, "the header (Columns × Rows)")
    if reason is None:
        reason = budget_reason(rows * cols, samples, max(bits // 8, 1), 1, wanted,
                               f"Rows × Columns × SamplesPerPixel = {rows} × {cols} × {samples}")
    if reason:
        raise DecodeError(reason)


def _header_int(ds: Dataset, keyword: str, low: int, high: int, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value in (None, "") and default is not None:
        return default
    try:
        number = int(value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue))
                     else value)
    except (TypeError, ValueError, IndexError):
        raise DecodeError(f"invalid {keyword} {str(value)[:40]!r} in the header") from None
    if not low <= number <= high:
        raise DecodeError(f"invalid {keyword} {number} in the header (must be {low}–{high})")
    return number


def whole_file_reason(ds: Dataset) -> str | None:
    """Why a decoder that turns every frame at once (GDCM) must not run on this object."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = frame_count(ds)
    return budget_reason(rows * cols, samples, max(int(ds.BitsAllocated) // 8, 1), frames,
                         frames, "decoding every frame at once")


# -- metadata and patient identity ---------------------------------------------------------
def patient_key(patient_id: str | None, policy: str, secret: bytes) -> str | None:
    """PHI policy: 'hash' → keyed HMAC (stable within a store, useless outside it)."""
    if not patient_id or policy == "drop":
        return None
    if policy == "keep":
        return patient_id
    return hmac.new(secret, patient_id.encode(), hashlib.sha256).hexdigest()[:32]


def dicom_metadata(ds: Dataset, phi_policy: str, secret: bytes) -> dict:
    """Only the allowed fields (schema.DICOM_FIELDS) plus the patient key; never names etc.

    Under ``drop`` the patient key is absent; PatientName, birth date, address, accession
    number and the other PS3.15 direct identifiers are never read into the result.
    """
    if phi_policy not in PHI_POLICIES:
        raise ValueError(f"PHI policy must be hash, keep or drop, got {phi_policy!r}")
    meta = {}
    for column, keyword in DICOM_FIELDS.items():
        try:
            value = ds.get(keyword)
        except Exception:  # an unparseable element is treated as absent
            continue
        if value is None or value == "":
            continue
        text = str(value).strip()
        if not text:
            continue
        if column in ("modality", "body_part", "view_position", "patient_sex"):
            text = text.upper()
        meta[column] = text[:64] if column.endswith("uid") or column in (
            "modality", "body_part", "view_position", "patient_sex", "patient_age",
            "study_date") else text
    if "study_date" in meta and not (len(meta["study_date"]) == 8 and meta["study_date"].isdigit()):
        meta.pop("study_date")  # a malformed date would break date filters
    key = patient_key(str(ds.get("PatientID", "") or "").strip(), phi_policy, secret)
    if key is not None:
        meta["patient_key"] = key
    return meta
