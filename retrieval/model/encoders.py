"""Encoders: the vision and text towers on a device, turning model inputs or text into unit
vectors."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, ModelUnavailableError
from . import acceleration
from .checkpoint import (DEFAULT_MODEL, Checkpoint, load_tower, quiet_transformers,
                         resolve_checkpoint, unavailable_message)
from .preprocess import model_input


def _normalise(vectors: torch.Tensor) -> np.ndarray:
    vectors = vectors.float()
    return torch.nn.functional.normalize(vectors, dim=-1).cpu().numpy().astype(np.float32)


def select_device(device: str = "auto") -> torch.device:
    """``auto`` → the GPU when torch sees one, else the CPU; a named device must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise InputError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}",
                         setting="device") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda asked for, but this torch build sees no GPU "
                         "(CPU build installed, or no driver); use device cpu or auto",
                         setting="device")
    return chosen


class VisionEncoder:
    """The vision tower: model-ready tensors → L2-normalised float32 vectors.

    ``cuda_bf16``: on CUDA, bf16 as "weights" (bf16 weights throughout) or "autocast" (fp32
    weights, products in bf16). ``cache_dir``: where ``precision="auto"`` keeps its CPU
    measurement (None: measured in memory once per process).
    """

    def __init__(self, checkpoint: Checkpoint, device: str = "auto", precision: str = "auto",
                 compile: bool = False, *, cuda_bf16: str = "weights",
                 cache_dir: Path | None = None) -> None:
        from transformers import SiglipVisionModel

        self.checkpoint = checkpoint
        self.device = select_device(device)
        self.cuda_bf16 = acceleration.check_cuda_bf16(cuda_bf16)
        self.precision = acceleration.resolve_precision(precision, self.device, cache_dir)
        self.model = acceleration.prepare_model(load_tower(SiglipVisionModel, checkpoint),
                                                self.device, self.precision, compile,
                                                cuda_bf16=self.cuda_bf16)
        self.image_size: int = int(self.model.config.image_size)
        self.dim: int = int(self.model.config.hidden_size)

    @classmethod
    def load(cls, name: str = DEFAULT_MODEL, device: str = "auto", precision: str = "auto",
             **options) -> "VisionEncoder":
        """Resolve ``name`` (hub id or folder) and load its vision tower (``options``: as
        ``__init__``)."""
        return cls(resolve_checkpoint(name), device, precision, **options)

    def preprocess(self, pixels: np.ndarray) -> torch.Tensor:
        """Pixels of any supported kind → this tower's 3×S×S input (the MedSigLIP recipe)."""
        return model_input(pixels, self.image_size)

    @torch.inference_mode()
    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        """N×3×S×S model inputs in [-1, 1] (or N×1×S×S grey planes) → N×dim unit vectors."""
        size = self.image_size
        if batch.ndim != 4 or batch.shape[1] not in (1, 3) or batch.shape[2:] != (size, size):
            raise ValueError(f"expected N×3×{size}×{size} (or N×1× grey), got {tuple(batch.shape)}")
        batch = acceleration.to_device(batch.float(), self.device)
        if batch.shape[1] == 1:  # grey crossed the bus as one plane
            batch = batch.expand(-1, 3, -1, -1)
        dtype = acceleration.input_dtype(self.device, self.precision, self.cuda_bf16)
        with acceleration.autocast(self.device, self.precision, self.cuda_bf16):
            out = self.model(pixel_values=batch.to(dtype))
        return _normalise(out.pooler_output)


class TextEncoder:
    """The text tower: strings → L2-normalised float32 vectors, with a cache for repeats."""

    def __init__(self, checkpoint: Checkpoint, device: str = "auto", precision: str = "auto", *,
                 cache_dir: Path | None = None) -> None:
        """``cache_dir``: where ``precision="auto"`` keeps its CPU measurement and the int8
        tower its quantised weights (None: in memory, quantised every time). ``loaded_from``
        says how the tower came: ``int8-cache``, ``int8-quantised`` or ``loaded``."""
        from transformers import AutoTokenizer

        from .texttower import load_text_tower

        self.checkpoint = checkpoint
        self.device = select_device(device)
        self.precision = acceleration.resolve_precision(precision, self.device, cache_dir)
        try:
            with quiet_transformers():  # config defaults warn about token ids it overrides
                self.tokenizer = AutoTokenizer.from_pretrained(checkpoint.path, local_files_only=True)
        except Exception as exc:
            raise ModelUnavailableError(unavailable_message(
                checkpoint.name, f"no usable tokenizer in {checkpoint.path}: {exc}")) from None
        self.model, self.loaded_from = load_text_tower(checkpoint, self.device, self.precision,
                                                       cache_dir)
        self.dim: int = int(self.model.config.hidden_size)
        self._cached = lru_cache(maxsize=1024)(self._embed_one)

    @classmethod
    def load(cls, name: str = DEFAULT_MODEL, device: str = "auto", precision: str = "auto",
             **options) -> "TextEncoder":
        """Resolve ``name`` (hub id or folder) and load its text tower (``options``: as
        ``__init__``)."""
        return cls(resolve_checkpoint(name), device, precision, **options)

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """MedSigLIP's text recipe: pad to 64 with max_length padding; ids only, no mask."""
        from .siglip_tokens import recipe_ids

        return recipe_ids(self.tokenizer, texts, "pt")

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        # The attention mask is deliberately not passed: the tower was trained without one.
        with acceleration.autocast(self.device, self.precision):
            out = self.model(input_ids=self.token_ids(texts).to(self.device))
        return _normalise(out.pooler_output)

    def _embed_one(self, text: str) -> bytes:
        return self.embed([text])[0].tobytes()

    def embed_cached(self, text: str) -> np.ndarray:
        """One query, remembered: repeated searches skip the tower."""
        return np.frombuffer(self._cached(text), dtype=np.float32).copy()
