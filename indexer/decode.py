"""One source (a file, or its bytes) → decoded frames as model inputs: the steps that indexing
workers and the decode entry (:mod:`indexer.view`) share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import torch

from retrieval.model.preprocess import expand_planes, model_planes
from retrieval.region import Region

from .dicom import (NoImage, dicom_metadata, frame_count, no_image_reason, patient_key,
                    read_dataset)
from .dicom_frames import dicom_frames
from .images import DecodeError, image_frames
from .pacs import PACS_KINDS, PacsAccess
from .sources import SourceFile


@dataclass(frozen=True)
class DecodeOptions:
    """What every worker needs to know, picklable."""

    image_size: int
    frames: str = "middle"         # all | first | middle | N (at most N, evenly spaced)
    phi_policy: str = "hash"       # hash | keep | drop
    phi_secret: bytes = field(default=b"", repr=False)  # the store's key: never in logs
    window: str = "file"           # file | auto | a CT preset (indexer.pixels.PRESETS)
    frame: int | None = None       # one given frame instead of the policy's (a preview)
    region: Region | None = None   # a box cut from the displayed image before the recipe
    pacs: PacsAccess = field(default_factory=PacsAccess)  # how PACS sources are fetched


@dataclass
class DecodedFrame:
    index: int
    width: int
    height: int
    planes: np.ndarray  # 1×S×S (grey) or 3×S×S (colour) float32 in [-1, 1]

    @property
    def tensor(self) -> np.ndarray:
        """The 3×S×S model input (grey travels between processes as one plane)."""
        return expand_planes(torch.from_numpy(self.planes)).numpy()


@dataclass
class Decoded:
    """The outcome for one source: frames to embed, or why there are none."""

    source: SourceFile
    content_hash: str = ""
    frames: list[DecodedFrame] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    error: str | None = None      # broken: counted as a failure
    skipped: str | None = None    # valid but nothing to embed (e.g. a DICOM SR)
    consent_key: str | None = None  # hashed patient key (withdrawn-consent check), never raw
    frame_count: int = 0          # frames the source declares (0: not read that far)


def content_hash(path: str | Path) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def select_frames(count: int, policy: str) -> list[int]:
    """Which frames of a multi-frame object to embed under a policy."""
    if count <= 1:
        return [0]
    if policy == "all":
        return list(range(count))
    if policy == "first":
        return [0]
    if policy == "middle":
        return [count // 2]
    try:
        limit = int(policy)
    except ValueError:
        raise ValueError(f"frames policy must be all, first, middle or a number, got {policy!r}")
    if limit >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(limit - 1, 1)) for i in range(limit)})


def wanted_frames(count: int, options: DecodeOptions) -> list[int]:
    """The frames to decode: the one asked for, else those the frames policy selects."""
    if options.frame is None:
        return select_frames(count, options.frames)
    if not 0 <= options.frame < count:
        raise DecodeError(f"frame {options.frame} does not exist (it has {count}, 0-based)")
    return [options.frame]


def _frame(index: int, pixels: np.ndarray, options: DecodeOptions) -> DecodedFrame:
    width, height = int(pixels.shape[1]), int(pixels.shape[0])
    if options.region is not None:
        try:
            x0, y0, x1, y1 = options.region.box(width, height, options.image_size)
        except ValueError as exc:
            raise DecodeError(str(exc)) from None
        pixels = pixels[y0:y1, x0:x1]
    return DecodedFrame(index, width, height, model_planes(pixels, options.image_size).numpy())


def _image_frames(data: str | bytes, options: DecodeOptions, result: Decoded) -> list[DecodedFrame]:
    def choose(count: int) -> list[int]:  # the count is known only once the file is open
        result.frame_count = count
        return wanted_frames(count, options)

    return [_frame(i, px, options) for i, px in image_frames(data, choose)]


def _dicom_frames(data: str | bytes, options: DecodeOptions, result: Decoded) -> list[DecodedFrame]:
    ds = read_dataset(data)
    result.metadata = dicom_metadata(ds, options.phi_policy, options.phi_secret)
    if options.phi_secret:  # hashed here, in the worker, under every PHI policy
        result.consent_key = patient_key(str(ds.get("PatientID", "") or "").strip(),
                                         "hash", options.phi_secret)
    if (reason := no_image_reason(ds)) is not None:
        raise NoImage(reason)
    result.frame_count = frame_count(ds)
    wanted = wanted_frames(result.frame_count, options)
    path = None if isinstance(data, (bytes, bytearray)) else data
    return [_frame(i, px, options) for i, px in dicom_frames(ds, path, wanted, options.window)]


def decode_source(source: SourceFile, options: DecodeOptions,
                  content: bytes | None = None) -> Decoded:
    """Decode one source (or, with ``content``, its bytes held in memory: an upload) into
    model inputs. Never raises for bad input: the reason goes into ``error`` or ``skipped``."""
    result = Decoded(source)
    try:
        if source.kind == "refused":  # e.g. a DICOMDIR record pointing outside its folder
            raise DecodeError(getattr(source, "reason", "") or "refused source, not read")
        if content is not None:  # not hashed: only indexing compares contents
            if not content:
                raise DecodeError("empty file (0 bytes)")
            data: str | bytes = content
        elif source.kind in PACS_KINDS:  # a PACS instance: fetched here, in the worker
            from .pacs import fetch

            data = fetch(source, options.pacs)
            result.content_hash = hashlib.blake2b(data, digest_size=20).hexdigest()
        elif source.kind == "received":  # pushed to `medsearch receive`: its spool file
            if not getattr(source, "spool", ""):
                raise DecodeError("a received instance is not kept once indexed (only its "
                                  "vector and allowed metadata are): no pixels to show")
            with open(source.spool, "rb") as fh:
                data = fh.read()
            result.content_hash = hashlib.blake2b(data, digest_size=20).hexdigest()
        elif source.size == 0:
            raise DecodeError("empty file (0 bytes)")
        else:
            result.content_hash = content_hash(source.path)
            data = source.path
        if source.kind in ("dicom", "received", *PACS_KINDS):
            result.frames = _dicom_frames(data, options, result)
        else:
            result.frames = _image_frames(data, options, result)
        if not result.frames:
            raise DecodeError("no frames could be decoded")
    except NoImage as exc:
        result.skipped, result.frames = str(exc), []
    except DecodeError as exc:
        result.error, result.frames = str(exc), []
    except MemoryError:
        result.error, result.frames = "out of memory while decoding", []
    except OSError as exc:  # EIO from a failing disk, a share gone mid-read, permissions
        result.error = (f"cannot read the file: {exc.strerror}" if exc.errno is not None
                        else f"unexpected {type(exc).__name__}: {exc}")  # errno-less: a decoder's
        result.frames = []
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # an unforeseen decoder bug (or a Rust panic, a
        # BaseException) must not cost the other files
        result.error, result.frames = f"unexpected {type(exc).__name__}: {exc}", []
    return result
