"""A region of interest on a query image: a pixel box, given on the displayed image or on the
model-view square a preview shows, checked once and mapped to displayed-image pixels.

The box is cut from the displayed (decoded, windowed) image before padding and resizing, so a
region embeds exactly as the same pixels saved as a file of their own do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InputError

SPACES = ("image", "preview")
#: No displayed image is larger than this on a side (the decoders' limits are far below it);
#: seven digits, as the API's form pattern allows.
MAX_COORDINATE = 9_999_999


@dataclass(frozen=True)
class Region:
    """``x, y, w, h`` in pixels of ``space``: "image" (the displayed image) or "preview" (the
    S×S model-view square: the image centred on a zero square, then resized to S)."""

    x: int
    y: int
    w: int
    h: int
    space: str = "image"

    @classmethod
    def parse(cls, value: str | list | tuple | None, space: str = "image") -> "Region | None":
        """``"X,Y,W,H"`` or four integers; None passes through. Bad values raise InputError
        naming ``region``."""
        if value is None:
            return None
        if space not in SPACES:
            raise InputError(f"region_space must be one of {', '.join(SPACES)}, got {space!r}",
                             setting="region_space")
        parts = value.split(",") if isinstance(value, str) else list(value)
        try:
            numbers = [int(str(p).strip()) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) != 4:
            raise InputError(f"region must be four whole numbers X,Y,W,H (pixels), got {value!r}",
                             setting="region")
        x, y, w, h = numbers
        if x < 0 or y < 0 or w < 1 or h < 1 or max(x, y, w, h) > MAX_COORDINATE:
            raise InputError(f"region {x},{y},{w},{h}: X and Y must be ≥ 0 and the width and "
                             "height ≥ 1 pixel", setting="region")
        return cls(x, y, w, h, space)

    def box(self, width: int, height: int, size: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in displayed-image pixels, clipped to the image; a box
        with nothing of the image in it raises ValueError with the reason."""
        x0, y0, x1, y1 = self.x, self.y, self.x + self.w, self.y + self.h
        if self.space == "preview":
            side = max(width, height)
            scale = side / size
            left, top = (side - width) // 2, (side - height) // 2
            x0, x1 = math.floor(x0 * scale) - left, math.ceil(x1 * scale) - left
            y0, y1 = math.floor(y0 * scale) - top, math.ceil(y1 * scale) - top
        x0, y0 = max(0, x0), max(0, y0)
        x1, y1 = min(width, x1), min(height, y1)
        if x1 <= x0 or y1 <= y0:
            where = f"the {size}×{size} preview" if self.space == "preview" else \
                f"the {width}×{height} image"
            raise ValueError(f"region {self.x},{self.y},{self.w},{self.h} holds no pixel of "
                             f"{where}")
        return x0, y0, x1, y1

    def to_json(self) -> dict:
        return {"region": [self.x, self.y, self.w, self.h], "region_space": self.space}
