"""How much one file may cost to decode: decided from its declared geometry, before any pixel
is allocated, so a few-kB file declaring gigapixels (a decompression bomb) is refused at once.

The one place for these limits. Each check returns a reason (naming the header field and the
limit) or None; the caller raises it as the file's DecodeError.
"""

from __future__ import annotations

#: Pixels in one frame. 2^27 ≈ 134 M (11,585²) admits whole CR/DX and mammograms (~5k × 6k =
#: 30 M), large secondary captures and every whole-slide tile; 16,384² and 24,000² are refused.
MAX_FRAME_PIXELS = 1 << 27
#: Bytes one decode may hold at once: the stored frame plus the float32 working copies the
#: display steps make (a 2^27-pixel RGB frame needs ~3.6 GB; a 16-bit grey one ~1.3 GB).
MAX_DECODED_BYTES = 4 << 30
#: Pixels decoded in all for one file. Animated PNG and GIF frames build on the one before,
#: so reaching frame N decodes N + 1 frames; TIFF pages and DICOM frames decode alone.
MAX_DECODED_PIXELS = 1 << 32
#: Each decoded frame counts at least this many pixels: per-frame overhead bounds the time
#: a file of a million 1×1 frames could take.
MIN_FRAME_COST = 1 << 16
#: NumberOfFrames above this is absurd (a whole-slide level has at most a few 100,000 tiles).
MAX_FRAMES = 1 << 21
#: Float working copies per sample the display steps hold beside the stored frame.
FLOAT_COPIES = 2


def frame_reason(width: int, height: int, what: str = "image") -> str | None:
    """Why a frame of this declared size is refused, or None."""
    if width <= 0 or height <= 0:
        return f"{what} declares {width}×{height} pixels (zero or negative size)"
    if width * height > MAX_FRAME_PIXELS:
        return (f"{what} declares {width}×{height} = {width * height:,} pixels per frame, over "
                f"the limit of {MAX_FRAME_PIXELS:,} (indexer.limits.MAX_FRAME_PIXELS): refused "
                "as a possible decompression bomb")
    return None


def working_bytes(pixels: int, samples: int, bytes_per_sample: int) -> int:
    """Bytes one frame holds while it is decoded and turned into float32 display values."""
    return pixels * samples * (bytes_per_sample + 4 * FLOAT_COPIES)


def budget_reason(pixels: int, samples: int, bytes_per_sample: int, frames_held: int = 1,
                  frames_decoded: int = 1, what: str = "image") -> str | None:
    """Why decoding ``frames_decoded`` frames (``frames_held`` at once) is refused, or None."""
    held = working_bytes(pixels, samples, bytes_per_sample) * max(frames_held, 1)
    if held > MAX_DECODED_BYTES:
        return (f"{what}: decoding needs {held / 2**30:.1f} GiB at once ({frames_held} frame(s) "
                f"of {pixels:,} pixels × {samples} sample(s) × {bytes_per_sample} byte(s)), over "
                f"the budget of {MAX_DECODED_BYTES / 2**30:.1f} GiB "
                "(indexer.limits.MAX_DECODED_BYTES)")
    cost = max(pixels, MIN_FRAME_COST) * max(frames_decoded, 1)
    if cost > MAX_DECODED_PIXELS:
        return (f"{what}: the wanted frame(s) mean decoding {frames_decoded:,} frame(s) of "
                f"{pixels:,} pixels, over the budget of {MAX_DECODED_PIXELS:,} pixels per file "
                "(indexer.limits.MAX_DECODED_PIXELS)")
    return None
