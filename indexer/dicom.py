"""DICOM objects to display-ready frames and PHI-safe metadata.

Order as a reading workstation: modality LUT (rescale) → VOI LUT or window → MONOCHROME1
inverted once; colour stays colour. Values come out as float32 in [0, 1].
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from retrieval.schema import DICOM_FIELDS

from .images import DecodeError


class NoImage(Exception):
    """A valid DICOM object without pixels (SR, RT, presentation state …): skipped, not failed."""


def read_dataset(path: str | Path) -> pydicom.Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError) as exc:
        raise DecodeError(f"not a readable DICOM file: {exc}") from None
    if len(ds) == 0 or ("SOPClassUID" not in ds and "PixelData" not in ds
                        and "DirectoryRecordSequence" not in ds):
        raise DecodeError("not a DICOM file (no DICOM elements could be read; truncated?)")
    return ds


def _has_pixels(ds: pydicom.Dataset) -> bool:
    return any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def frame_count(ds: pydicom.Dataset) -> int:
    return int(getattr(ds, "NumberOfFrames", 1) or 1)


def to_display(ds: pydicom.Dataset, raw: np.ndarray) -> np.ndarray:
    """One decoded frame → float32 [0, 1], windowed and with MONOCHROME1 inverted."""
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if raw.ndim == 3 and raw.shape[-1] in (3, 4):  # colour: already RGB (pydicom converts YBR)
        if photometric == "PALETTE COLOR":
            raise DecodeError("unexpected palette data")
        maxval = float(2 ** int(getattr(ds, "BitsStored", 8)) - 1)
        return np.clip(raw[..., :3].astype(np.float32) / maxval, 0.0, 1.0)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(raw, ds).astype(np.float32)
        return rgb / (65535.0 if rgb.max() > 255 else 255.0)
    values = apply_modality_lut(raw, ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        try:
            values = apply_voi_lut(values, ds, index=0).astype(np.float64)
        except Exception:
            pass  # a broken window is no reason to lose the image: fall back to min/max
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    unit = np.nan_to_num((values - lo) / (hi - lo) if hi > lo else np.zeros_like(values), nan=0.0)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


def dicom_frames(ds: pydicom.Dataset, path: str | Path, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Decode only the wanted frames (never the whole multi-frame array at once)."""
    if not _has_pixels(ds):
        raise NoImage(f"no pixel data ({getattr(ds, 'Modality', '?')} "
                      f"{_sop_class_name(ds)})")
    from pydicom.pixels import pixel_array

    for index in indices:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                raw = pixel_array(ds, index=index) if frame_count(ds) > 1 else ds.pixel_array
        except Exception as exc:  # decoders raise many types; all mean "cannot decode"
            raise DecodeError(f"cannot decode pixel data "
                              f"({_transfer_syntax(ds)}): {exc}") from None
        yield index, to_display(ds, raw)


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    return getattr(uid, "name", str(uid)) if uid else "unknown transfer syntax"


def _sop_class_name(ds: pydicom.Dataset) -> str:
    uid = getattr(ds, "SOPClassUID", None)
    return getattr(uid, "name", str(uid)) if uid else "unknown SOP class"


def patient_key(patient_id: str | None, policy: str, secret: bytes) -> str | None:
    """PHI policy: 'hash' → keyed HMAC (stable within a store, useless outside it)."""
    if not patient_id or policy == "drop":
        return None
    if policy == "keep":
        return patient_id
    return hmac.new(secret, patient_id.encode(), hashlib.sha256).hexdigest()[:32]


def dicom_metadata(ds: pydicom.Dataset, phi_policy: str, secret: bytes) -> dict:
    """Only the allowed fields (schema.DICOM_FIELDS) plus the patient key; never names etc."""
    meta = {}
    for column, keyword in DICOM_FIELDS.items():
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        text = str(value).strip()
        if column in ("modality", "body_part", "view_position"):
            text = text.upper()
        meta[column] = text[:64] if column.endswith("uid") else text
    meta["patient_key"] = patient_key(str(ds.get("PatientID", "") or ""), phi_policy, secret)
    return meta
