"""The model package's names and constants that cost no import of torch or transformers: the
command line, the settings and the store read them on every start, most runs need no model."""

from __future__ import annotations

#: The checkpoint a store is built with unless told otherwise.
DEFAULT_MODEL = "google/medsiglip-448"
#: Config types whose towers load with SiglipVisionModel / SiglipTextModel.
SIGLIP_TYPES = {"siglip", "siglip_vision_model", "siglip_text_model"}
#: Text recipe: every query is padded to this many tokens (the tower pools the last position).
TEXT_MAX_LENGTH = 64
#: Bumped whenever the image recipe changes; stores refuse vectors made with another version.
PREPROCESSING_VERSION = "medsiglip-pad-bilinear-noaa-v1"


def effective_text_runtime(runtime: str, device: str) -> str:
    """The text tower a run uses: "onnx" (the tower exported to ONNX int8,
    retrieval.model.onnx_text) runs on the CPU only, any other device runs torch's."""
    return runtime if device in ("auto", "cpu") else "torch"
