"""DICOM objects to display-ready frames and PHI-safe metadata.

Reading is lenient (files without file meta or preamble, big endian, implicit VR) but never
silent: an object that cannot become an image raises :class:`DecodeError` (broken) or
:class:`NoImage` (valid, nothing to show), each with a reason a user can act on.

Decoding tries pydicom's plugins first (pylibjpeg with openjpeg and RLE, pyjpegls, Pillow,
python-gdcm), then GDCM directly (12-bit JPEG Extended and other gaps of the plugins), then a
per-frame decode for whole-slide tiles encoded smaller than the tile size. The display steps
live in :mod:`indexer.pixels`; values come out as float32 in [0, 1].
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (UID, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

from retrieval.store.schema import DICOM_FIELDS

from .images import DecodeError
from .limits import MAX_FRAMES, budget_reason, frame_reason
from .pixels import colour_to_unit, grey_to_unit, palette_to_unit

PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Above this, multi-frame files are read frame by frame from disk instead of into memory.
DEFER_BYTES = 16 * 1024 * 1024
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Elements that describe how to display a frame; copied into a per-frame view.
_DISPLAY_KEYWORDS = (
    "Modality", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SamplesPerPixel", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
)
#: Enhanced multi-frame functional groups that carry rescale and window per frame.
_FRAME_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


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


# -- per-frame display attributes --------------------------------------------------------
def frame_view(ds: Dataset, index: int) -> Dataset:
    """The display attributes that hold for one frame: top level, then shared, then per-frame
    functional groups (enhanced multi-frame CT/MR/PET keep rescale and window there)."""
    if "SharedFunctionalGroupsSequence" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
        return ds
    view = Dataset()
    for keyword in _DISPLAY_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
    groups = []
    for keyword, item in (("SharedFunctionalGroupsSequence", 0),
                          ("PerFrameFunctionalGroupsSequence", index)):
        seq = ds.get(keyword)
        if seq is not None and len(seq) > item:
            groups.append(seq[item])
    for group in groups:
        for keyword in _FRAME_GROUPS:
            seq = group.get(keyword)
            if seq:
                for element in seq[0]:
                    view[element.tag] = element
    view.file_meta = ds.file_meta
    view.set_original_encoding(*ds.original_encoding)
    return view


# -- decoding ------------------------------------------------------------------------------
def _decode_with_pydicom(ds: Dataset, path: str | Path | None, index: int, frames: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path is not None and frames > 1 and _is_deferred(ds):
            # large multi-frame file: read only this frame's bytes from disk
            return pixel_array(os.fspath(path), index=index)
        return pixel_array(ds, index=index if frames > 1 else None)


def _is_deferred(ds: Dataset) -> bool:
    for tag in PIXEL_TAGS:
        if tag in ds:
            raw = ds.get_item(tag)
            return getattr(raw, "value", b"") is None
    return False


def _decode_with_gdcm(ds: Dataset, path: str | Path | None, index: int) -> np.ndarray:
    """GDCM directly: its own IJG builds decode 8/12/16-bit JPEG that the plugins refuse.

    GDCM parses the file again by itself and allocates what the file claims (fuzzed inputs
    made it take 4 GB), so it is used only where it is needed, the JPEG family (12-bit JPEG
    Extended is the gap found in practice; native and RLE data never reach it), after the
    codestream size check, once pydicom has parsed the fragments, and on a copy pydicom wrote
    (every length then agrees with the bytes that follow). The whole-file budget bounds what
    it decodes. And it runs in a forked child under a memory and time limit (fuzzed JPEG
    Extended streams made its reader take 3.8 GB even so).
    """
    if (reason := whole_file_reason(ds)) is not None:
        raise DecodeError(reason)
    deferred = _is_deferred(ds)
    if _is_encapsulated(ds) and not deferred:
        from pydicom.encaps import generate_fragments

        try:
            for _ in generate_fragments(ds.PixelData):
                pass
        except Exception as exc:
            raise DecodeError(f"malformed encapsulated pixel data: {_first_line(exc)}") from None
    tmp = None
    if path is None or not Path(path).is_file() or (_is_encapsulated(ds) and not deferred):
        fd, tmp = tempfile.mkstemp(suffix=".dcm")
        os.close(fd)
        ds.save_as(tmp, enforce_file_format=False)
        path = tmp
    try:
        from .isolation import LimitedCallFailed, call_limited

        stored = rows_cols_samples_bytes(ds) * frame_count(ds)
        try:
            data, scalar = call_limited(_gdcm_buffer, (os.fspath(path),), timeout_s=GDCM_TIMEOUT_S,
                                        memory_bytes=GDCM_MEMORY_BYTES + 3 * stored)
        except LimitedCallFailed as exc:
            raise DecodeError(str(exc)) from None
        dtype = {"UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16,
                 "UINT32": np.uint32, "INT32": np.int32, "FLOAT32": np.float32,
                 "FLOAT64": np.float64}.get(scalar)
        if dtype is None:
            raise DecodeError(f"GDCM returned unsupported pixel type {scalar}")
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        per_frame = rows * cols * samples
        flat = np.frombuffer(data, dtype=dtype)
        if flat.size < per_frame * (index + 1):
            raise DecodeError("GDCM returned fewer pixels than the header describes")
        frame = flat[per_frame * index: per_frame * (index + 1)]
        if samples == 1:
            return frame.reshape(rows, cols)
        if int(ds.get("PlanarConfiguration", 0) or 0) == 1 and not _is_encapsulated(ds):
            return frame.reshape(samples, rows, cols).transpose(1, 2, 0)
        return frame.reshape(rows, cols, samples)
    finally:
        if tmp:
            os.unlink(tmp)


#: GDCM runs in a child with this much address space (plus 3× the stored pixel bytes) to spare.
GDCM_MEMORY_BYTES = 512 << 20
GDCM_TIMEOUT_S = 60.0


def rows_cols_samples_bytes(ds: Dataset) -> int:
    """Stored bytes of one frame, from the (already checked) header."""
    return (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
            * max(int(ds.BitsAllocated) // 8, 1))


def _gdcm_buffer(path: str) -> tuple[bytes, str]:
    """(decoded bytes of every frame, scalar type): run in a limited child by call_limited."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(path)
    if not reader.Read():
        raise DecodeError("GDCM could not read the file")
    image = reader.GetImage()
    buffer = image.GetBuffer()
    if buffer is None:
        raise DecodeError("GDCM could not decode the pixel data")
    data = buffer.encode("utf-8", "surrogateescape") if isinstance(buffer, str) else buffer
    return bytes(data), image.GetPixelFormat().GetScalarTypeAsString()


def _is_jpeg_family(ds: Dataset) -> bool:
    """JPEG, JPEG-LS and JPEG 2000 transfer syntaxes (1.2.840.10008.1.2.4.x)."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return str(uid or "").startswith("1.2.840.10008.1.2.4.")


def _is_encapsulated(ds: Dataset) -> bool:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return bool(uid) and UID(str(uid)).is_compressed


def _decode_edge_tile(ds: Dataset, index: int, frames: int) -> np.ndarray:
    """Whole-slide edge tiles encoded smaller than Rows×Columns: decode alone, pad with black."""
    from PIL import Image
    from pydicom.encaps import get_frame

    if not _is_encapsulated(ds):
        raise DecodeError("not an encapsulated frame")
    data = get_frame(ds.PixelData, index, number_of_frames=frames)
    rows, cols = int(ds.Rows), int(ds.Columns)
    with Image.open(io.BytesIO(data)) as img:
        if img.size[0] > cols or img.size[1] > rows:  # refused before the tile is decoded
            raise DecodeError(f"frame {index} is {img.size[0]}×{img.size[1]}, larger than the "
                              f"header's {cols}×{rows}")
        tile = np.asarray(img.convert("RGB") if img.mode in ("YCbCr", "P", "CMYK") else img)
    if tile.shape[0] > rows or tile.shape[1] > cols:
        raise DecodeError(f"frame {index} is {tile.shape[1]}×{tile.shape[0]}, larger than the "
                          f"header's {cols}×{rows}")
    padded = np.zeros((rows, cols, *tile.shape[2:]), dtype=tile.dtype)
    padded[:tile.shape[0], :tile.shape[1]] = tile
    return padded


def decode_stored(ds: Dataset, path: str | Path | None, index: int) -> np.ndarray:
    """One frame's stored values (YBR already RGB), trying every decoder we have.

    Raises DecodeError naming the transfer syntax and every decoder's complaint.
    """
    frames = frame_count(ds)
    if not 0 <= index < frames:
        raise DecodeError(f"frame {index} does not exist (the object has {frames})")
    check_pixel_module(ds)  # every caller gets the geometry limits, not only dicom_frames
    if (reason := codestream_reason(ds, index, frames)) is not None:
        raise DecodeError(reason)
    complaints = []
    decoders = [("pydicom", lambda: _decode_with_pydicom(ds, path, index, frames)),
                ("gdcm", lambda: _decode_with_gdcm(ds, path, index)),
                ("tile", lambda: _decode_edge_tile(ds, index, frames))]
    if not _is_jpeg_family(ds):  # GDCM fills the plugins' JPEG gaps (see _decode_with_gdcm),
        decoders = decoders[:1]  # and tiles are JPEG or JPEG 2000
    for name, decode in decoders:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                array = decode()
            return _gdcm_colour(ds, array) if name == "gdcm" else array
        except (MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # decoders raise many types; all mean "cannot decode"
            # (a Rust decoder's panic arrives as pyo3's PanicException, a BaseException)
            complaints.append(f"{name}: {_first_line(exc)}")
    raise DecodeError(f"cannot decode pixel data ({transfer_syntax(ds)}): " + "; ".join(complaints))


def _gdcm_colour(ds: Dataset, array: np.ndarray) -> np.ndarray:
    """GDCM leaves uncompressed YBR as stored; convert once, as pydicom would have."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if array.ndim == 3 and photometric in ("YBR_FULL", "YBR_FULL_422") and not _is_encapsulated(ds):
        from pydicom.pixels import convert_color_space

        return convert_color_space(array, photometric, "RGB")
    return array


def codestream_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG, JPEG-LS or JPEG 2000 codestream declares, None if not found.

    Decoders allocate what the codestream says, whatever Rows and Columns say."""
    from pydicom.pixels.utils import _get_jpg_parameters

    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 24:  # J2K: SOC, then SIZ
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", data[8:24])
        return max(xsiz - xosiz, 0), max(ysiz - yosiz, 0)
    if data[:2] == b"\xff\xd8":
        try:
            params = _get_jpg_parameters(data)
        except Exception:
            return None
        if "width" in params and "height" in params:
            return int(params["width"]), int(params["height"])
    return None


def codestream_reason(ds: Dataset, index: int, frames: int) -> str | None:
    """Why a compressed frame is refused before decoding: its codestream declares more pixels
    than Rows × Columns (a bomb hiding behind a small header). Deferred (large) pixel data
    is left to the decoders, under the worker's or the upload child's limits."""
    if not _is_encapsulated(ds) or _is_deferred(ds):
        return None
    try:
        from pydicom.encaps import get_frame

        data = get_frame(ds.PixelData, index, number_of_frames=frames)
    except Exception:
        return None  # the decoders will say what is wrong
    size = codestream_size(data)
    if size is None:
        return None
    width, height = size
    rows, cols = int(ds.Rows), int(ds.Columns)
    if width * height > rows * cols:
        return (f"frame {index}: the compressed data declares {width}×{height} pixels, more "
                f"than the header's Columns × Rows = {cols} × {rows}: refused before decoding")
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def to_display(ds: Dataset, stored: np.ndarray, index: int = 0, window: str = "file") -> np.ndarray:
    """One decoded frame → float32 [0, 1] (H×W grey or H×W×3 colour), as a workstation shows it."""
    view = frame_view(ds, index)
    photometric = str(view.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR" and stored.ndim == 2:
        return palette_to_unit(stored, ds)
    if stored.ndim == 3 and stored.shape[-1] in (3, 4):
        return colour_to_unit(stored, view)
    if stored.ndim == 3 and stored.shape[-1] == 1:
        stored = stored[..., 0]
    if stored.ndim != 2:
        raise DecodeError(f"unexpected decoded frame shape {stored.shape}")
    return grey_to_unit(stored, view, window)


def dicom_frames(ds: Dataset, path: str | Path | None, indices: list[int],
                 window: str = "file") -> Iterator[tuple[int, np.ndarray]]:
    """Decode only the wanted frames (never the whole multi-frame array at once)."""
    reason = no_image_reason(ds)
    if reason:
        raise NoImage(reason)
    check_pixel_module(ds, len(indices))
    for index in indices:
        stored = decode_stored(ds, path, index)
        yield index, to_display(ds, stored, index, window)


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
    if phi_policy not in ("hash", "keep", "drop"):
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
