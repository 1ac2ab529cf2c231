"""The MedSigLIP image recipe: pixels of any bit depth to the tensor the vision tower expects.

Recipe (model card / Google's serving code): values to [0, 1] by bit depth, grey copied to
three channels, alpha dropped, centred zero padding to a square, bilinear resize to the
checkpoint's size *without* antialiasing, then [-1, 1]. The Transformers image processor
resizes through PIL, which antialiases, so it is deliberately not used here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .names import PREPROCESSING_VERSION  # noqa: F401 - re-exported: stores record it


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """Scale integer pixels to float32 [0, 1] by their bit depth; floats are clipped."""
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / 255.0
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / 65535.0
    if pixels.dtype == bool:
        return pixels.astype(np.float32)
    if np.issubdtype(pixels.dtype, np.floating):
        out = np.clip(pixels.astype(np.float32, copy=False), 0.0, 1.0)  # ±inf → 1 / 0
        if np.isnan(out).any():
            np.nan_to_num(out, copy=False, nan=0.0)
        return out
    raise TypeError(
        f"pixels of dtype {pixels.dtype} have no defined bit depth; convert to uint8, "
        "uint16 or float in [0, 1] first"
    )


def to_rgb(unit: np.ndarray) -> np.ndarray:
    """H×W, H×W×1, H×W×2 (grey+alpha), H×W×3 or H×W×4 → H×W×3 (alpha dropped)."""
    if unit.ndim == 2:
        unit = unit[:, :, None]
    if unit.ndim != 3:
        raise ValueError(f"expected a 2-D image or H×W×C array, got shape {unit.shape}")
    channels = unit.shape[2]
    if channels in (1, 2):
        return np.repeat(unit[:, :, :1], 3, axis=2)
    if channels in (3, 4):
        return unit[:, :, :3]
    raise ValueError(f"cannot make RGB from {channels} channels")


def pad_to_square(chw: torch.Tensor) -> torch.Tensor:
    """Centre a C×H×W image on a zero square; the odd pixel goes to the bottom/right.

    This and :func:`resize_square` are the recipe as tensor operations (usable on any torch
    device); :func:`model_input` computes the same on the host, reading only sampled lines."""
    _, h, w = chw.shape
    if h == w:
        return chw
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(chw, (left, side - w - left, top, side - h - top), value=0.0)


def resize_square(chw: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize without antialiasing (half-pixel centres, as tf.image.resize)."""
    if chw.shape[-1] == size and chw.shape[-2] == size:
        return chw
    return F.interpolate(
        chw[None], size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )[0]


def bilinear_taps(side: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (low, high) and the high row's weight of a bilinear resize side → size,
    half-pixel centres, no antialiasing: the coordinates torch's ``interpolate`` uses."""
    src = np.maximum((np.arange(size, dtype=np.float64) + 0.5) * (side / size) - 0.5, 0.0)
    low = np.minimum(src.astype(np.int64), side - 1)
    return low, np.minimum(low + 1, side - 1), src - low


def _blend_axis(image: np.ndarray, axis: int, offset: int, side: int, size: int) -> np.ndarray:
    """Resize one axis of an image centred at ``offset`` on a zero-padded square of ``side``,
    reading only the source lines the output needs (as float64)."""
    extent = image.shape[axis]
    low, high, weight = bilinear_taps(side, size)
    shape = [1, 1, 1]
    shape[axis] = size
    weight = weight.reshape(shape)
    out = None
    for taps, w in ((low, 1.0 - weight), (high, weight)):
        taps = taps - offset
        outside = (taps < 0) | (taps >= extent)  # lines of the zero padding
        term = np.take(image, np.clip(taps, 0, extent - 1), axis=axis).astype(np.float64)
        if outside.any():
            term *= ~outside.reshape(shape)
        term *= w
        out = term if out is None else np.add(out, term, out=out)
    return out


def unit_rgb_to_model_input(unit_rgb: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """H×W×C float in [0, 1] → C×size×size float32 in [-1, 1]: centred zero padding to a
    square, then bilinear resize.

    Computed in float64 (the float32 kernel's coordinate rounding alone moves pixels ~4e-5),
    one axis at a time over only the source lines the output samples: a 2048² radiograph
    contributes 2×448 rows, so the whole image is never converted to float64.
    """
    image = np.asarray(unit_rgb)
    h, w = image.shape[:2]
    side = max(h, w)
    rows = _blend_axis(image, 0, (side - h) // 2, side, size)
    square = _blend_axis(rows, 1, (side - w) // 2, side, size)
    return torch.from_numpy(np.ascontiguousarray((square * 2.0 - 1.0).transpose(2, 0, 1),
                                                 dtype=np.float32))


def model_planes(pixels: np.ndarray, size: int) -> torch.Tensor:
    """The model input before channel copying: 1×size×size for grey, 3×size×size for colour.

    Every step is per channel, so resizing one grey channel and copying it equals resizing
    three copies, at a third of the work and a third of the bytes sent between processes.
    """
    unit = to_unit_range(pixels)
    if unit.ndim == 2 or (unit.ndim == 3 and unit.shape[2] in (1, 2)):
        grey = unit if unit.ndim == 2 else unit[:, :, 0]
        return unit_rgb_to_model_input(grey[:, :, None], size)
    return unit_rgb_to_model_input(to_rgb(unit), size)


def expand_planes(planes: torch.Tensor) -> torch.Tensor:
    """1×S×S grey planes → 3×S×S (a copy); colour passes through."""
    return planes.expand(3, -1, -1).contiguous() if planes.shape[0] == 1 else planes


def model_input(pixels: np.ndarray, size: int) -> torch.Tensor:
    """Any supported pixel array → the vision tower's 3×size×size input."""
    return expand_planes(model_planes(pixels, size))


def model_input_to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Invert the final scaling so a user can see exactly what the model sees (H×W×3 uint8)."""
    unit = ((tensor.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (unit.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
