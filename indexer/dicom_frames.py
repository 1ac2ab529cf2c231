"""A DICOM frame to display pixels: stored values decoded (pydicom's plugins, then GDCM,
then a per-frame decode for whole-slide edge tiles) and turned into float32 [0, 1] as a
workstation shows it, with the per-frame functional groups of enhanced multi-frame objects."""

from __future__ import annotations

import io
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from .dicom import (PIXEL_TAGS, NoImage, check_pixel_module, frame_count, no_image_reason,
                    transfer_syntax, whole_file_reason)
from .images import DecodeError
from .pixels import colour_to_unit, grey_to_unit, palette_to_unit


#: Elements that describe how to display a frame; copied into a per-frame view.
_DISPLAY_KEYWORDS = (
    "Modality", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SamplesPerPixel", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
)
#: Enhanced multi-frame functional groups that carry rescale and window per frame.
_FRAME_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


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
    return bool(uid) and UID(str(uid)).is_transfer_syntax and UID(str(uid)).is_compressed


#: Transfer syntaxes newer than the decoders, by name (pydicom knows only their UIDs).
NEWER_SYNTAXES = {"1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
                  "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
                  "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
                  "1.2.840.10008.1.2.4.112": "JPEG XL",
                  "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 Lossless",
                  "1.2.840.10008.1.2.4.202": "High-Throughput JPEG 2000 RPCL Lossless",
                  "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000"}


def unknown_syntax_reason(ds: Dataset) -> str | None:
    """Why pixels in a transfer syntax no decoder here knows cannot be read (None: known)."""
    uid = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or "")
    if not uid or UID(uid).is_transfer_syntax:
        return None
    name = NEWER_SYNTAXES.get(uid, "not a transfer syntax pydicom or GDCM knows")
    return (f"unsupported transfer syntax {uid} ({name}): no decoder here reads it; convert "
            "the file to a supported syntax (e.g. with gdcmconv or dcmconv) and index that")


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
    if (reason := unknown_syntax_reason(ds) or codestream_reason(ds, index, frames)) is not None:
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
