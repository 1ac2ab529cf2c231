"""Model towers: load a SigLIP-family checkpoint and turn pixels or text into unit vectors.

Indexing needs only the vision tower and text queries only the text tower, so each is loaded
on its own (an "unexpected keys" report for the other tower is expected and silenced).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import acceleration
from .errors import InputError, ModelUnavailableError
from .preprocess import model_input

DEFAULT_MODEL = "google/medsiglip-448"
TEXT_MAX_LENGTH = 64
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint resolved to a local folder, with what identifies its weights."""

    name: str          # as the user gave it: hub id or folder path
    path: Path         # local folder holding config.json and the weights
    revision: str      # hub commit, or "local"
    fingerprint: str   # hash of config and weight samples: equal weights ⇒ equal fingerprint

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())


def _unavailable_message(name: str, reason: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    lines = [f"cannot load model {name!r}: {reason}"]
    if "/" in name and not Path(name).exists():
        lines.append(
            "MedSigLIP is gated: accept the Health AI Developer Foundations terms on its "
            "Hugging Face page, then `hf auth login` (or set HF_TOKEN) and run again."
        )
        if offline:
            lines.append("HF_HUB_OFFLINE is set, so only a copy already in the local cache is used.")
    lines.append("Or pass --model PATH with a local checkpoint folder "
                 "(`medsearch make-test-model DIR` makes a tiny random one for trying things out).")
    return "\n".join(lines)


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def resolve_checkpoint(name: str = DEFAULT_MODEL) -> Checkpoint:
    """Find the checkpoint locally or in the hub cache (downloading when allowed)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelUnavailableError(_unavailable_message(name, f"{folder} has no config.json"))
        return Checkpoint(name, folder.resolve(), "local", _fingerprint(folder))
    if folder.suffix or name.count("/") != 1:
        raise ModelUnavailableError(_unavailable_message(name, "no such folder, and not a hub id"))
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(
            name,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
            local_files_only=os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"),
        ))
    except Exception as exc:  # gated, not found, offline, no network: all end the same way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailableError(_unavailable_message(name, reason)) from None
    return Checkpoint(name, local, local.name, _fingerprint(local))


@contextlib.contextmanager
def quiet_transformers():
    """Loading one tower reports the other's weights as unexpected; that is by design."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


#: Config types whose towers load with SiglipVisionModel / SiglipTextModel.
SIGLIP_TYPES = {"siglip", "siglip_vision_model", "siglip_text_model"}


def _load_tower(cls, checkpoint: Checkpoint):
    model_type = checkpoint.config.get("model_type")
    if model_type not in SIGLIP_TYPES:
        raise ModelUnavailableError(
            f"{checkpoint.name} is a {model_type!r} checkpoint; medsearch needs a SigLIP-family "
            "checkpoint (config model_type 'siglip'), such as google/medsiglip-448.")
    try:
        with quiet_transformers():
            return cls.from_pretrained(checkpoint.path, local_files_only=True).eval()
    except Exception as exc:
        raise ModelUnavailableError(_unavailable_message(
            checkpoint.name, f"{cls.__name__} could not load {checkpoint.path}: {exc}")) from None


def _normalise(vectors: torch.Tensor) -> np.ndarray:
    vectors = vectors.float()
    return torch.nn.functional.normalize(vectors, dim=-1).cpu().numpy().astype(np.float32)


def select_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but this torch build sees no GPU "
                         "(CPU build installed, or no driver); use --device cpu or auto")
    return chosen


class VisionEncoder:
    """The vision tower: model-ready tensors (or raw pixels) → L2-normalised float32 vectors."""

    def __init__(self, checkpoint: Checkpoint, device: str = "auto", precision: str = "auto",
                 compile_model: bool = False) -> None:
        from transformers import SiglipVisionModel

        self.checkpoint = checkpoint
        self.device = select_device(device)
        self.precision = acceleration.resolve_precision(precision, self.device)
        self.model = acceleration.prepare_model(_load_tower(SiglipVisionModel, checkpoint),
                                                self.device, self.precision, compile_model)
        self.image_size: int = int(self.model.config.image_size)
        self.dim: int = int(self.model.config.hidden_size)

    @classmethod
    def load(cls, name: str = DEFAULT_MODEL, device: str = "auto",
             precision: str = "auto") -> "VisionEncoder":
        return cls(resolve_checkpoint(name), device, precision)

    def preprocess(self, pixels: np.ndarray) -> torch.Tensor:
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
        with acceleration.autocast(self.device, self.precision):
            out = self.model(pixel_values=batch.to(acceleration.input_dtype(self.device, self.precision)))
        return _normalise(out.pooler_output)

    def embed_pixels(self, images: list[np.ndarray]) -> np.ndarray:
        if self.device.type == "cuda":  # resize and scale on the GPU: only raw pixels travel
            return self.embed_batch(torch.stack([
                acceleration.device_model_input(img, self.image_size, self.device) for img in images]))
        return self.embed_batch(torch.stack([self.preprocess(img) for img in images]))


class TextEncoder:
    """The text tower: strings → L2-normalised float32 vectors, with a cache for repeats."""

    def __init__(self, checkpoint: Checkpoint, device: str = "auto", precision: str = "auto") -> None:
        from transformers import AutoTokenizer, SiglipTextModel

        self.checkpoint = checkpoint
        self.device = select_device(device)
        self.precision = acceleration.resolve_precision(precision, self.device)
        try:
            with quiet_transformers():  # config defaults warn about token ids it overrides
                self.tokenizer = AutoTokenizer.from_pretrained(checkpoint.path, local_files_only=True)
        except Exception as exc:
            raise ModelUnavailableError(_unavailable_message(
                checkpoint.name, f"no usable tokenizer in {checkpoint.path}: {exc}")) from None
        self.model = acceleration.prepare_model(_load_tower(SiglipTextModel, checkpoint),
                                                self.device, self.precision)
        self.dim: int = int(self.model.config.hidden_size)
        self._cached = lru_cache(maxsize=1024)(self._embed_one)

    @classmethod
    def load(cls, name: str = DEFAULT_MODEL, device: str = "auto",
             precision: str = "auto") -> "TextEncoder":
        return cls(resolve_checkpoint(name), device, precision)

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        """MedSigLIP's text recipe: pad to 64 with max_length padding; ids only, no mask."""
        encoded = self.tokenizer(list(texts), padding="max_length", max_length=TEXT_MAX_LENGTH,
                                 truncation=True, return_tensors="pt")
        return encoded["input_ids"]

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
