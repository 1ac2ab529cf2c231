"""Raw vectors as stored bytes: float16 (little-endian) blobs in, float32 arrays out.

At 100M images float32 raw vectors are 460 GB; float16 halves that and keeps cos ≥ 0.99999
to the float32 vector (benchmarks/vectors_f16.py measures it). The format is told apart by a
blob's length (2·dim bytes: float16, 4·dim: float32 from a store written before migration
0003), so a reader decodes either and callers always get float32; the writer only writes
float16. The same bytes serve every database back end.
"""

from __future__ import annotations

import numpy as np

from ..errors import StoreError

#: What a vector blob holds now, and what stores before the float16 migration (0003) hold.
STORED = np.dtype("<f2")
LEGACY = np.dtype("<f4")
#: The settings row recording the blob format (written by the float16 migration (0003)).
FORMAT_SETTING = "vector_format"
FORMAT = "float16"


def blob_size(dim: int) -> int:
    """Bytes of one stored (float16) vector."""
    return STORED.itemsize * int(dim)


def legacy_size(dim: int) -> int:
    """Bytes of one float32 vector as stores before the float16 migration (0003) hold it."""
    return LEGACY.itemsize * int(dim)


def valid_sizes(dim: int) -> tuple[int, int]:
    """Blob lengths that hold ``dim`` values (float16 or a not yet migrated float32)."""
    return blob_size(dim), legacy_size(dim)


def as_stored(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (n×d or d) as float16, refusing what float16 cannot hold (inf/NaN)."""
    with np.errstate(over="ignore"):  # checked just below
        half = np.asarray(vectors, np.float32).astype(STORED)
    if not np.isfinite(half).all():
        # an unnormalised vector beyond ±65504 would be stored as inf and break every score
        raise StoreError("a vector has values float16 cannot store (|x| > 65504, inf or NaN); "
                         "stored vectors must be finite and normalised")
    return half


def encode(vectors: np.ndarray) -> list[bytes]:
    """One float16 blob per row of ``vectors`` (n×d)."""
    half = as_stored(np.atleast_2d(vectors))
    return [row.tobytes() for row in half]


def decode(blobs: list[bytes], dim: int) -> np.ndarray:
    """n×dim float32 from blobs of either format (told apart by length)."""
    return decode_compact(blobs, dim).astype(np.float32, copy=False)


def decode_compact(blobs: list[bytes], dim: int) -> np.ndarray:
    """n×dim from blobs of either format: float16 when every blob is (half the memory of
    float32, for callers that convert block by block), else float32."""
    if not blobs:
        return np.zeros((0, dim), np.float32)
    half, full = valid_sizes(dim)
    if all(len(b) == half for b in blobs):  # the common case: one join, no per-row work
        return np.frombuffer(b"".join(blobs), STORED).reshape(len(blobs), dim)
    out = np.empty((len(blobs), dim), np.float32)
    for row, blob in enumerate(blobs):
        if len(blob) == half:
            out[row] = np.frombuffer(blob, STORED)
        elif len(blob) == full:
            out[row] = np.frombuffer(blob, LEGACY)
        else:
            raise StoreError(f"a stored vector of {len(blob)} bytes holds no {dim} values; "
                             "run `medsearch check`")
    return out
