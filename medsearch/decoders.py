"""The application's two decoders: an upload's bytes and an indexed row's source → model input."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from retrieval.errors import InputError

_UPLOAD_SUFFIX = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}


def decode_upload(content: bytes, kind: str, size: int) -> np.ndarray:
    """An uploaded file's bytes → model input, decoded exactly as the indexer decodes files,
    but in a child process with memory and time limits (indexer.isolation): a crafted upload
    costs a 422, never the server."""
    from indexer.decode import DecodeOptions
    from indexer.isolation import decode_isolated
    from indexer.sources import SourceFile

    with tempfile.TemporaryDirectory(prefix="medsearch-upload-") as folder:
        path = Path(folder) / f"upload{_UPLOAD_SUFFIX[kind]}"
        path.write_bytes(content)
        decoded = decode_isolated(
            SourceFile(str(path), len(content), 0, "dicom" if kind == "dicom" else "image"),
            DecodeOptions(image_size=size, frames="middle", phi_policy="drop"))
    if decoded.error or decoded.skipped or not decoded.frames:
        reason = decoded.error or decoded.skipped or "no frames"
        raise InputError(reason.replace(str(path), "upload").replace(folder, "."))
    return decoded.frames[0].tensor


def decode_stored(path: str, frame: int, size: int) -> np.ndarray:
    """An indexed source's frame → model input (for previews); the path comes from the store."""
    from indexer.dicom import NoImage, dicom_frames, read_dataset
    from indexer.images import DecodeError, image_frame
    from indexer.sources import classify
    from retrieval.preprocess import model_input

    source = Path(path)
    if not source.is_file():
        raise InputError("the source file is no longer there")
    try:
        if classify(source) == "dicom":
            ds = read_dataset(source)
            pixels = next(px for _, px in dicom_frames(ds, source, [frame]))
        else:
            pixels = image_frame(source, frame)
    except (DecodeError, NoImage, OSError, StopIteration) as exc:
        raise InputError(f"cannot decode it again: {exc or 'frame not found'}") from None
    return model_input(pixels, size).numpy()
