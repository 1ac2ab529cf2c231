"""Checkpoints: find a SigLIP-family checkpoint, fingerprint its weights, and load one tower.

Indexing needs only the vision tower and text queries only the text tower, so each is loaded
on its own (an "unexpected keys" report for the other tower is expected and silenced).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelUnavailableError
from .names import DEFAULT_MODEL, SIGLIP_TYPES

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

    def vision_shape(self) -> tuple[int, int]:
        """(input image size, embedding width) of the vision tower, from the config alone: for
        a process that must know them without loading the weights."""
        from transformers import AutoConfig

        with quiet_transformers():
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        vision = getattr(config, "vision_config", config)
        return int(vision.image_size), int(vision.hidden_size)


def hub_offline() -> bool:
    """The hub library's own resolved offline setting (it reads ``HF_HUB_OFFLINE`` once)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unavailable_message(name: str, reason: str) -> str:
    """Why a checkpoint cannot be loaded, and the ways to make it loadable."""
    offline = hub_offline()
    lines = [f"cannot load model {name!r}: {reason}"]
    if "/" in name and not Path(name).exists():
        lines.append(
            "MedSigLIP is gated: accept the Health AI Developer Foundations terms on its "
            "Hugging Face page, then `hf auth login` (or set HF_TOKEN) and run again."
        )
        if offline:
            lines.append("HF_HUB_OFFLINE is set, so only a copy already in the local cache is used.")
    lines.append("Or name a local checkpoint folder as the model (--model PATH, or the model "
                 "setting); `medsearch make-test-model DIR` makes a tiny random one for trying "
                 "things out.")
    return "\n".join(lines)


def fingerprint(folder: Path) -> str:
    """A hash of the config and samples of each weight file: equal weights ⇒ equal value,
    without reading gigabytes on every start."""
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
            raise ModelUnavailableError(unavailable_message(name, f"{folder} has no config.json"))
        return Checkpoint(name, folder.resolve(), "local", fingerprint(folder))
    if folder.suffix or name.count("/") != 1:
        raise ModelUnavailableError(unavailable_message(name, "no such folder, and not a hub id"))
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(
            name,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
            local_files_only=hub_offline(),
        ))
    except Exception as exc:  # gated, not found, offline, no network: all end the same way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailableError(unavailable_message(name, reason)) from None
    return Checkpoint(name, local, local.name, fingerprint(local))


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


def load_tower(cls, checkpoint: Checkpoint):
    """One tower class (SiglipVisionModel / SiglipTextModel) from the checkpoint, in eval mode."""
    model_type = checkpoint.config.get("model_type")
    if model_type not in SIGLIP_TYPES:
        raise ModelUnavailableError(
            f"{checkpoint.name} is a {model_type!r} checkpoint; medsearch needs a SigLIP-family "
            "checkpoint (config model_type 'siglip'), such as google/medsiglip-448.")
    try:
        with quiet_transformers():
            return cls.from_pretrained(checkpoint.path, local_files_only=True).eval()
    except Exception as exc:
        raise ModelUnavailableError(unavailable_message(
            checkpoint.name, f"{cls.__name__} could not load {checkpoint.path}: {exc}")) from None


def config_image_size(checkpoint: Checkpoint) -> int:
    """The vision input size from config.json (no transformers import), else transformers'."""
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError, KeyError):
        config = checkpoint.config
        return int(config.get("vision_config", config)["image_size"])
    return checkpoint.vision_shape()[0]


def safetensors_files(folder: Path, holding=None) -> list[Path]:
    """The checkpoint's safetensors files; a sharded one's index names them, and ``holding``
    (a test of a tensor's key) keeps only the files whose tensors pass it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = {file for key, file in weight_map.items() if holding is None or holding(key)}
        return [folder / name for name in sorted(names)]
    return sorted(folder.glob("*.safetensors"))
