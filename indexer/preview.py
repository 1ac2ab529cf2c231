"""The image the model sees, as 8-bit RGB: the one renderer for previews and thumbnails.

It runs the indexer's own steps (DICOM display steps or image decoding, then the MedSigLIP
recipe: pad to square, bilinear resize, [-1, 1]) and inverts only the final scaling, so what a
user checks is exactly what was embedded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.errors import InputError
from retrieval.model.preprocess import model_input, model_input_to_uint8

from .decode import select_frames
from .images import DecodeError, image_frame, image_frame_count
from .sources import classify


def model_view(path: str | Path, frame: int | None = None, size: int = 448,
               window: str = "file") -> tuple[np.ndarray, int, int]:
    """(H×W×3 uint8 model input, frame index used, frame count) for a file.

    ``frame=None`` takes the frame the indexer embeds by default (the middle one).
    """
    from .dicom import NoImage, dicom_frames, frame_count, read_dataset

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    try:
        if (classify(p) or "image") == "dicom":
            ds = read_dataset(p)
            count = frame_count(ds)
            index = select_frames(count, "middle")[0] if frame is None else frame
            if not 0 <= index < count:
                raise InputError(f"{path}: frame {index} does not exist (it has {count}, 0-based)")
            _, unit = next(dicom_frames(ds, p, [index], window))
        else:
            count = image_frame_count(p)
            index = 0 if frame is None else frame
            if not 0 <= index < count:
                raise InputError(f"{path}: frame {index} does not exist (it has {count}, 0-based)")
            unit = image_frame(p, index)
    except (DecodeError, NoImage) as exc:
        raise InputError(f"{path}: {exc}") from None
    return model_input_to_uint8(model_input(unit, size)), index, count
