"""Plain image files (PNG, JPEG, TIFF, BMP) to pixel arrays at their own bit depth."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

Image.MAX_IMAGE_PIXELS = 400_000_000  # whole radiographs are large; bombs are still refused


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


def image_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Every frame of an image file (TIFF stacks have several), EXIF orientation applied."""
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            n = 0
            for frame in ImageSequence.Iterator(img):
                frame.load()
                frame = ImageOps.exif_transpose(frame) if n == 0 else frame
                pixels = _pixels(frame)
                if pixels.size == 0:
                    raise DecodeError("image has no pixels (zero width or height)")
                n += 1
                yield pixels
    except UnidentifiedImageError:
        raise DecodeError("not a readable image (unknown or corrupt format: check the file "
                          "is really what its name says)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from None
