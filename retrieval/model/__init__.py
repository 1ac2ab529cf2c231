"""The model: checkpoints, the vision and text encoders, their devices and the image recipe."""

from .checkpoint import (DEFAULT_MODEL, SIGLIP_TYPES, Checkpoint, fingerprint, load_tower,
                         quiet_transformers, resolve_checkpoint)
from .encoders import TEXT_MAX_LENGTH, TextEncoder, VisionEncoder, select_device
from .preprocess import PREPROCESSING_VERSION, model_input

__all__ = [
    "DEFAULT_MODEL", "PREPROCESSING_VERSION", "SIGLIP_TYPES", "TEXT_MAX_LENGTH", "Checkpoint",
    "TextEncoder", "VisionEncoder", "fingerprint", "load_tower", "model_input",
    "quiet_transformers", "resolve_checkpoint", "select_device",
]
