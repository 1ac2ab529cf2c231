"""Plain image files (PNG, JPEG, TIFF, BMP) to pixel arrays at their own bit depth."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .limits import MAX_FRAME_PIXELS, budget_reason, frame_reason

# Pillow's own guard stays as a backstop far above ours (it errors at twice this); ours runs
# first, on every frame, with a reason naming the size, and never lets a warning through.
Image.MAX_IMAGE_PIXELS = 4 * MAX_FRAME_PIXELS


class DecodeError(Exception):
    """A broken or unreadable file; the message is the reason recorded for it."""


def _pixels(img: Image.Image) -> np.ndarray:
    """Keep 16-bit data 16-bit (the recipe scales by bit depth); colour to RGB(A)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(img)
        if arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.uint16)
        arr = arr.astype(np.float64)
        return ((arr - arr.min()) / max(np.ptp(arr), 1)).astype(np.float32)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        finite = arr[np.isfinite(arr)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        return np.nan_to_num((arr - lo) / max(hi - lo, 1e-12), nan=0.0).astype(np.float32)
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"))
    if mode in ("LA", "RGBA", "RGB"):
        return np.asarray(img)
    if mode == "P":
        return np.asarray(img.convert("RGBA" if "transparency" in img.info else "RGB"))
    return np.asarray(img.convert("RGB"))  # CMYK, YCbCr, LAB, HSV …


#: Formats whose frames decode independently (seek goes straight to a page); in every other
#: multi-frame format (APNG, GIF, WebP, FLI …) a frame is composed on top of the one before.
RANDOM_ACCESS_FORMATS = {"TIFF", "MPO", "ICNS", "ICO", "DCX", "SPIDER", "IM"}

Wanted = Union[list[int], Callable[[int], list[int]], None]


def _bytes_per_pixel(img: Image.Image) -> int:
    """Bytes per pixel in Pillow's memory (8-bit modes with several bands take 4)."""
    if img.mode in ("1", "L", "P"):
        return 1
    return 2 if img.mode.startswith("I;16") else 4


def _check(img: Image.Image, frames_decoded: int, what: str) -> None:
    width, height = img.size
    reason = frame_reason(width, height, what) or budget_reason(
        width * height, 1, _bytes_per_pixel(img), 1, frames_decoded, what)
    if reason:
        raise DecodeError(reason)


def _open(source: str | Path | bytes) -> Image.Image:
    """Pillow's lazy open of a file, or of a file's bytes held in memory (an upload)."""
    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def image_frames(source: str | Path | bytes,
                 wanted: Wanted = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, pixels) of the wanted frames of an image file (or its bytes), EXIF orientation
    on frame 0.

    ``wanted`` is a list of indices, a function of the frame count giving them, or None for
    all. Each frame's declared size is checked against :mod:`indexer.limits` before it is
    loaded, and only the frames needed are decoded: TIFF pages by seeking to them, animated
    PNG/GIF up to the last wanted frame (each builds on the one before).
    """
    try:
        with warnings.catch_warnings():  # a warned-about size is refused just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open(source)
        with img:
            _check(img, 1, "image")  # the header's size, before verify reads anything
            img.verify()
        with _open(source) as img:  # no warning now: the size passed the check above
            yield from _frames(img, wanted)
    except UnidentifiedImageError:
        raise DecodeError("not a readable image (unknown or corrupt format: check the file "
                          "is really what its name says)") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"refused as a possible decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from None


def _frames(img: Image.Image, wanted: Wanted) -> Iterator[tuple[int, np.ndarray]]:
    count = max(int(getattr(img, "n_frames", 1) or 1), 1)
    indices = (list(range(count)) if wanted is None else
               wanted(count) if callable(wanted) else list(wanted))
    indices = sorted(set(indices))
    if not indices:
        return
    if indices[0] < 0 or indices[-1] >= count:
        raise DecodeError(f"frame {indices[-1]} does not exist (the image has {count})")
    sequential = count > 1 and img.format not in RANDOM_ACCESS_FORMATS
    decoded = indices[-1] + 1 if sequential else len(indices)
    _check(img, decoded, f"{img.format or 'image'} with {count} frame(s)")
    for index in indices:
        if index != img.tell():
            img.seek(index)
        _check(img, decoded, f"frame {index}")  # TIFF pages each have their own size
        img.load()
        frame = ImageOps.exif_transpose(img) if index == 0 else img
        pixels = _pixels(frame)
        if pixels.size == 0:
            raise DecodeError("image has no pixels (zero width or height)")
        yield index, pixels
