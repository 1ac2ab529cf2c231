"""The one decode entry: a file, a file's bytes or a stored image → what the model sees.

Every caller that needs the model's input for something a user gives (a query file, an
upload, an indexed image's preview, `embed`, `classify`, `report`) comes here, and this runs
the indexer's own steps (:func:`indexer.decode.decode_source`: DICOM display steps or image
decoding, then the MedSigLIP recipe), so a preview shows exactly what was embedded and a query
is embedded exactly as the store's images were. The settings a store was indexed with travel
in its manifest (:class:`DecodeSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from retrieval.errors import InputError, NotFoundError
from retrieval.model.preprocess import model_input_to_uint8
from retrieval.region import Region

from .decode import Decoded, DecodeOptions, decode_source
from .decode_settings import DecodeSettings, settings_for_run  # noqa: F401 - re-exported
from .pacs import PacsAccess, pacs_kind
from .sources import SourceFile, classify, content_kind
from .spool import PREFIX as RECEIVED_PREFIX

#: What errors about in-memory bytes call them.
UPLOAD_NAME = "upload"


@dataclass
class ModelImage:
    """One frame as the model gets it."""

    frame: int
    frame_count: int
    tensor: np.ndarray  # 3×S×S float32 in [-1, 1]

    def display_rgb(self) -> np.ndarray:
        """H×W×3 uint8: the model input with only its final scaling undone (previews)."""
        return model_input_to_uint8(torch.from_numpy(self.tensor))


def read_image(source: str | Path | bytes, *, image_size: int,
               settings: DecodeSettings = DecodeSettings(), frame: int | None = None,
               isolated: bool = False, region: Region | None = None) -> ModelImage:
    """One frame of a file (or of a file's bytes) as the model sees it.

    ``frame=None`` takes the first frame ``settings.frames`` selects (what indexing embeds
    first); ``isolated`` decodes in a child process under memory and time limits
    (:mod:`indexer.isolation`), for bytes from outside. Raises :class:`InputError` naming the
    file (or "upload") and the reason. ``region``: embed only that box of the displayed image
    (retrieval.region), cut before padding and resizing.
    """
    decoded = _decode(source, _options(image_size, settings, frame, region), isolated)
    first = decoded.frames[0]
    return ModelImage(first.index, decoded.frame_count, first.tensor)


def read_images(source: str | Path | bytes, *, image_size: int,
                settings: DecodeSettings = DecodeSettings()) -> list[ModelImage]:
    """Every frame ``settings.frames`` selects, as the model sees them."""
    decoded = _decode(source, _options(image_size, settings, None), isolated=False)
    return [ModelImage(f.index, decoded.frame_count, f.tensor) for f in decoded.frames]


def read_stored(path: str, frame: int, *, image_size: int, decode: dict | None = None,
                region: Region | None = None, pacs: PacsAccess | None = None) -> ModelImage:
    """An indexed image (its path and frame from the store) decoded again with the settings
    the store recorded (``manifest.decode``), as it was embedded; a PACS instance is fetched
    again (``pacs``: how to reach it)."""
    settings = DecodeSettings.from_manifest(decode)
    kind = remote_kind(path)
    if kind is None:
        if not Path(path).is_file():
            raise NotFoundError(f"{path}: the source file is no longer there")
        return read_image(path, image_size=image_size, settings=settings, frame=frame,
                          region=region)
    options = replace(_options(image_size, settings, frame, region), pacs=pacs or PacsAccess())
    decoded = _checked(decode_source(SourceFile(path, 0, 0, kind), options), path)
    return ModelImage(decoded.frames[0].index, decoded.frame_count, decoded.frames[0].tensor)


def remote_kind(path: str) -> str | None:
    """The source kind of a stored path that is not a local file (None: a file)."""
    if path.startswith(RECEIVED_PREFIX):
        return "received"
    return pacs_kind(path)


def _options(image_size: int, settings: DecodeSettings, frame: int | None,
             region: Region | None = None) -> DecodeOptions:
    # phi "drop": what a user hands in is decoded for its pixels; its header is not kept
    return DecodeOptions(image_size=image_size, frames=settings.frames, phi_policy="drop",
                         window=settings.window, frame=frame, region=region)


def _decode(source: str | Path | bytes, options: DecodeOptions, isolated: bool) -> Decoded:
    if isinstance(source, (bytes, bytearray)):
        name, content = UPLOAD_NAME, bytes(source)
        item = SourceFile(UPLOAD_NAME, len(content), 0, content_kind(content))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise NotFoundError(f"{source}: no such file")
        stat = path.stat()
        name, content = str(source), None
        item = SourceFile(str(path.absolute()), stat.st_size, stat.st_mtime_ns,
                          classify(path) or "image")
    if isolated:
        from .isolation import decode_isolated

        decoded = decode_isolated(item, options, content=content)
    else:
        decoded = decode_source(item, options, content)
    return _checked(decoded, name)


def _checked(decoded: Decoded, name: str) -> Decoded:
    if decoded.error or decoded.skipped or not decoded.frames:
        raise InputError(f"{name}: {decoded.error or decoded.skipped or 'no frames'}")
    return decoded
