"""Display steps for one decoded DICOM frame, each a small function, in a reading workstation's order.

    stored values ─ modality LUT / rescale ─ VOI LUT or window (or a named preset, or a
    percentile fallback) ─ MONOCHROME1 inverted once ─ float32 in [0, 1]

Colour frames skip the grey steps: PALETTE COLOR goes through its lookup table, RGB (and
YBR, which pydicom already converted to RGB while decoding) is scaled by BitsStored.
Every step is NaN-safe, so float and double-float pixel data never poison an embedding.
The window maths is PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID) written out, because
pydicom's ``apply_windowing`` returns values in the stored range while we need [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi

#: Named windows (centre, width) in Hounsfield units, as radiology workstations ship them.
#: They apply to CT only: HU mean nothing for other modalities, which keep their own window.
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
}
#: ``file``: the file's first VOI LUT or window, percentile fallback; ``auto``: percentiles.
WINDOW_CHOICES = ("file", "auto", *PRESETS)
#: Percentile fallback bounds: robust against a few hot pixels and padding values.
PERCENTILES = (0.5, 99.5)
#: Frames with more pixels than this are windowed in float32 instead of float64.
FLOAT64_MAX_PIXELS = 1 << 24


@dataclass(frozen=True)
class Window:
    centre: float
    width: float
    function: str = "LINEAR"


def check_window_choice(choice: str) -> str:
    choice = (choice or "file").lower()
    if choice not in WINDOW_CHOICES:
        raise ValueError(f"window must be one of {', '.join(WINDOW_CHOICES)}, got {choice!r}")
    return choice


def _first(value) -> float | None:
    """First value of a possibly multi-valued DS element, or None when empty/invalid."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def file_window(view: pydicom.Dataset, continuous: bool = False) -> Window | None:
    """The first window in the (frame's) attributes, if it is usable.

    LINEAR (PS3.3 C.11.2.1.2.1) is written for integer stored values: its ``c - 0.5`` and
    ``w - 1`` assume steps of one, so W = 1 is a threshold and W < 1 is not allowed. Float
    pixel data (``continuous``: parametric maps, PET SUV, probabilities) has no such steps, and
    a map in [0, 1] labelled C = 0.5, W = 1 means "show the range 0–1", not "threshold at 0";
    for it a width of 1 or less is read as LINEAR_EXACT (C.11.2.1.3.2), which maps exactly
    [c - w/2, c + w/2] to the output range.
    """
    centre, width = _first(view.get("WindowCenter")), _first(view.get("WindowWidth"))
    if centre is None or width is None or width <= 0:
        return None
    function = str(view.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if function == "LINEAR" and (width < 1 or (continuous and width <= 1)):
        function = "LINEAR_EXACT"
    return Window(centre, width, function)


def _working_dtype(stored: np.ndarray) -> type:
    """float64 for frames up to FLOAT64_MAX_PIXELS (so embeddings in existing stores stay
    bit-identical) and for double data (float32 would turn large values into infinities);
    float32 above, where a frame's float copies are what costs memory (2^27 pixels: 0.5 GB
    each instead of 1 GB)."""
    pixels = stored.shape[0] * stored.shape[1] if stored.ndim >= 2 else stored.size
    if stored.dtype == np.float64 or pixels <= FLOAT64_MAX_PIXELS:
        return np.float64
    return np.float32


def _lut_usable(view: pydicom.Dataset) -> bool:
    """A Modality LUT item needs its descriptor (3 numbers) and its data to mean anything."""
    try:
        item = view.ModalityLUTSequence[0]
        descriptor, data = item.get("LUTDescriptor"), item.get("LUTData")
        return descriptor is not None and len(descriptor) == 3 and data is not None and len(data) > 0
    except (AttributeError, IndexError, TypeError, KeyError):
        return False


def modality_lut(stored: np.ndarray, view: pydicom.Dataset) -> np.ndarray:
    """Stored values → modality values (HU for CT) as float, by LUT or slope/intercept.

    A Modality LUT Sequence whose item lacks LUTDescriptor or LUTData (or that pydicom cannot
    apply) is ignored, as a workstation would: rescale slope/intercept, else the raw values.
    """
    dtype = _working_dtype(stored)
    if "ModalityLUTSequence" in view and _lut_usable(view):
        try:
            return apply_modality_lut(stored, view).astype(dtype)
        except Exception:  # a malformed table is no reason to lose the image
            pass
    values = stored.astype(dtype)  # a new array: the steps below work in place
    slope, intercept = _first(view.get("RescaleSlope")), _first(view.get("RescaleIntercept"))
    if slope is not None and slope != 0:
        values *= dtype(slope)
    if intercept is not None:
        values += dtype(intercept)
    return values


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing straight to [0, 1]."""
    c, w = window.centre, window.width
    if window.function == "SIGMOID":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if window.function == "LINEAR_EXACT":
        offset, scale = c, w
    elif w > 1:
        offset, scale = c - 0.5, w - 1.0
    else:
        return (values > c - 0.5).astype(values.dtype)
    out = values - offset  # one temporary, then in place: these arrays are 32 MB at 2048²
    out /= scale
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def voi_lut_sequence(values: np.ndarray, view: pydicom.Dataset) -> np.ndarray | None:
    """The first VOI LUT of the sequence, normalised by its output bit depth; None if absent."""
    if "VOILUTSequence" not in view:
        return None
    try:
        item = view.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        out = apply_voi(values, view, index=0).astype(values.dtype)
    except Exception:
        return None  # a broken LUT is no reason to lose the image: the window/percentiles take over
    top = float(2 ** bits - 1) if 1 <= bits <= 16 else float(np.nanmax(out) or 1.0)
    if np.nanmax(out) > top:  # descriptors that lie about their bit depth exist
        top = float(np.nanmax(out))
    return np.clip(out / top, 0.0, 1.0)


def percentile_window(values: np.ndarray) -> np.ndarray:
    """Fallback when a file has no window: stretch the robust range of the finite values."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, values.dtype)
    lo, hi = np.percentile(finite, PERCENTILES)
    if hi <= lo:  # flat or binary images (1-bit segmentations): use the full range
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape, values.dtype)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def grey_to_unit(stored: np.ndarray, view: pydicom.Dataset, choice: str = "file") -> np.ndarray:
    """Modality LUT → VOI (preset, file LUT/window or percentiles) → MONOCHROME1 inverted."""
    modality = str(view.get("Modality", "") or "").upper()
    values = modality_lut(stored, view)
    continuous = np.issubdtype(stored.dtype, np.floating)
    unit = None
    if choice in PRESETS and modality == "CT":
        centre, width = PRESETS[choice]
        unit = apply_window(values, Window(centre, width))
    elif choice == "file" or choice in PRESETS:
        window = file_window(view, continuous)
        if window is not None:
            unit = apply_window(values, window)
        else:
            unit = voi_lut_sequence(values, view)  # a VOI LUT's input is the modality output
    if unit is None:
        unit = percentile_window(values)
    if str(view.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        unit = 1.0 - unit
    if not np.isfinite(unit).all():  # float pixel data (or a broken rescale) can hold NaN/inf
        unit = np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0)
    return unit.astype(np.float32)


def palette_to_unit(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """PALETTE COLOR indices → RGB [0, 1] through the file's lookup tables."""
    rgb = apply_color_lut(stored, ds)
    bits = int(ds.get("RedPaletteColorLookupTableDescriptor", [0, 0, 16])[2] or 16)
    top = 255.0 if bits <= 8 else 65535.0
    if rgb.max() > top:
        top = float(rgb.max())
    return np.clip(rgb.astype(np.float32) / top, 0.0, 1.0)


def colour_to_unit(rgb: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """RGB (YBR already converted by the decoder) → [0, 1] by BitsStored; alpha dropped."""
    rgb = rgb[..., :3]
    if np.issubdtype(rgb.dtype, np.floating):
        return np.clip(np.nan_to_num(rgb.astype(np.float32), nan=0.0), 0.0, 1.0)
    bits = int(ds.get("BitsStored", 0) or 0) or 8 * rgb.dtype.itemsize
    top = float(2 ** min(bits, 8 * rgb.dtype.itemsize) - 1)
    return np.clip(rgb.astype(_working_dtype(rgb)) / top, 0.0, 1.0).astype(np.float32)
