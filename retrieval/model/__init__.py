"""The model: checkpoints, the vision and text encoders, their devices and the image recipe.

Names are resolved on first use (PEP 562): importing this package costs nothing, so a command
that needs no model (``info``, ``similar --id``) never imports torch or transformers. Import
the constants from :mod:`retrieval.model.names` or from here; both are free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .names import DEFAULT_MODEL, PREPROCESSING_VERSION, SIGLIP_TYPES, TEXT_MAX_LENGTH

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from .checkpoint import (Checkpoint, fingerprint, load_tower, quiet_transformers,
                             resolve_checkpoint)
    from .encoders import TextEncoder, VisionEncoder, select_device
    from .preprocess import model_input

#: Lazily resolved name → the submodule that defines it.
_LAZY = {
    "Checkpoint": "checkpoint", "fingerprint": "checkpoint", "load_tower": "checkpoint",
    "quiet_transformers": "checkpoint", "resolve_checkpoint": "checkpoint",
    "TextEncoder": "encoders", "VisionEncoder": "encoders", "select_device": "encoders",
    "model_input": "preprocess",
}

__all__ = [
    "DEFAULT_MODEL", "PREPROCESSING_VERSION", "SIGLIP_TYPES", "TEXT_MAX_LENGTH", "Checkpoint",
    "TextEncoder", "VisionEncoder", "fingerprint", "load_tower", "model_input",
    "quiet_transformers", "resolve_checkpoint", "select_device",
]


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` the first time it is asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
