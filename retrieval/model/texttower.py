"""The text tower, loaded fast: only its own weights, memory-mapped, and its int8 form cached.

``from_pretrained`` on the full checkpoint builds the tower with random initial weights, reads
the file and copies every tensor in. Here the tower is built on the ``meta`` device (no memory,
no initialisation) and its parameters are *assigned* the tensors of the text weights, which
``safe_open`` hands out memory-mapped: nothing is copied and the vision weights are never
touched. A ``.bin`` checkpoint, or anything this path does not recognise, falls back to
``from_pretrained`` (:func:`checkpoint.load_tower`).

The int8 tower (``precision="int8"``: dynamic quantisation of every Linear) is quantised once
per checkpoint and kept in the cache folder, keyed by the checkpoint's fingerprint, the torch
version and the quantisation engine; later loads build an int8 skeleton and load the packed
weights. An entry is written atomically (temporary file, then rename) with a sidecar recording
its SHA-256; an entry that is missing its sidecar, does not match it, or does not load into the
skeleton is ignored and the tower quantised again (and the entry rewritten).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import torch

from ..errors import ModelUnavailableError
from .checkpoint import (SIGLIP_TYPES, Checkpoint, load_tower, quiet_transformers,
                         safetensors_files)

log = logging.getLogger(__name__)
#: Prefix of the text tower's keys in a full SigLIP checkpoint (absent in a text-only one).
TEXT_PREFIX = "text_model."
INT8_CACHE_VERSION = 1
INT8_FOLDER = "text-int8"
#: Loads in this process by path taken ("safetensors", "from_pretrained", "int8-cache"):
#: tests tell a cached load from a fresh one by it, not by time.
loads: dict[str, int] = {}


def _count(kind: str) -> None:
    loads[kind] = loads.get(kind, 0) + 1


def _text_config(checkpoint: Checkpoint):
    """The text tower's config, as ``SiglipTextModel.from_pretrained`` would derive it."""
    from transformers import SiglipTextConfig

    with quiet_transformers():
        return SiglipTextConfig.from_pretrained(checkpoint.path, local_files_only=True)


def _skeleton(checkpoint: Checkpoint):
    """The text tower on the meta device: its structure, no storage, no initialisation."""
    from transformers import SiglipTextModel

    config = _text_config(checkpoint)
    with quiet_transformers(), torch.device("meta"):
        model = SiglipTextModel._from_config(config, attn_implementation="sdpa")
    return model.eval()


def _fill_buffers(model: torch.nn.Module) -> bool:
    """Give the non-persistent buffers (not in any checkpoint) their values; False where a
    meta tensor is left that this does not know how to fill."""
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is None or not buffer.is_meta:
                continue
            if name != "position_ids":
                return False
            module.register_buffer(name, torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                   persistent=False)
    return not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def text_state(checkpoint: Checkpoint, wanted: set[str]) -> dict[str, torch.Tensor] | None:
    """The text tower's tensors named as ``wanted`` (the tower's own state-dict keys),
    memory-mapped from the safetensors files; None where they are not all there."""
    from safetensors import safe_open

    files = safetensors_files(checkpoint.path)
    if not files:
        return None
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                name = key[len(TEXT_PREFIX):] if key.startswith(TEXT_PREFIX) else key
                if name in wanted and name not in state:
                    state[name] = handle.get_tensor(key)
    return state if set(state) == wanted else None


def load_text_fast(checkpoint: Checkpoint):
    """The text tower from the safetensors weights alone (None: not possible here)."""
    if checkpoint.config.get("model_type") not in SIGLIP_TYPES:
        return None
    try:
        model = _skeleton(checkpoint)
        state = text_state(checkpoint, set(model.state_dict()))
        if state is None:
            return None
        model.load_state_dict(state, strict=True, assign=True)
        if not _fill_buffers(model):
            return None
    except Exception as exc:  # an unfamiliar layout: the general loader decides
        log.debug("fast text-tower load of %s not possible (%r)", checkpoint.path, exc)
        return None
    return model.eval()


def load_text_model(checkpoint: Checkpoint):
    """The fp32 text tower: memory-mapped safetensors where possible, else ``from_pretrained``."""
    from transformers import SiglipTextModel

    model = load_text_fast(checkpoint)
    if model is not None:
        _count("safetensors")
        return model
    _count("from_pretrained")
    return load_tower(SiglipTextModel, checkpoint)


# -- the int8 tower's cache ------------------------------------------------------------------------
def int8_entry(cache_dir: Path, checkpoint: Checkpoint) -> Path:
    """Where the int8 tower of ``checkpoint`` is kept (its sidecar: same name, ``.json``)."""
    engine = torch.backends.quantized.engine
    version = torch.__version__.replace("+", "-")
    return Path(cache_dir) / INT8_FOLDER / f"{checkpoint.fingerprint}-{engine}-torch{version}.pt"


def _identity(checkpoint: Checkpoint) -> dict:
    return {"version": INT8_CACHE_VERSION, "fingerprint": checkpoint.fingerprint,
            "torch": torch.__version__, "engine": torch.backends.quantized.engine}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)  # releases the GIL: runs beside the weights' packing
    return digest.hexdigest()


def _int8_skeleton(checkpoint: Checkpoint):
    """The int8 tower's structure: the meta skeleton with every Linear a dynamic int8 Linear
    (what ``quantize_dynamic`` makes), ready for the cached weights. Each is made 1×1 and
    given its real shape by the weights loaded into it: packing an empty full-size weight
    first cost 3 s for MedSigLIP-448's text tower."""
    from torch.ao.nn.quantized import dynamic as nnqd

    model = _skeleton(checkpoint)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:  # exact type, as quantize_dynamic({Linear})
                layer = nnqd.Linear(1, 1, bias_=child.bias is not None, dtype=torch.qint8)
                layer.in_features, layer.out_features = child.in_features, child.out_features
                setattr(parent, name, layer)
    return model


def _shapes_match(model: torch.nn.Module, state: dict) -> bool:
    """Every int8 Linear's cached weight has the shape its place in the tower needs (read
    from the entry: unpacking the loaded weights would copy them all)."""
    from torch.ao.nn.quantized import dynamic as nnqd

    for name, module in model.named_modules():
        if isinstance(module, nnqd.Linear):
            packed = state.get(f"{name}._packed_params._packed_params")
            if not isinstance(packed, tuple) or not packed or tuple(packed[0].shape) != (
                    module.out_features, module.in_features):
                return False
    return True


def load_int8_cached(cache_dir: Path, checkpoint: Checkpoint):
    """The cached int8 tower, or None (no entry, or one that is corrupt or another's)."""
    path = int8_entry(cache_dir, checkpoint)
    sidecar = path.with_suffix(".json")
    try:
        record = json.loads(sidecar.read_text())
        if {k: record.get(k) for k in _identity(checkpoint)} != _identity(checkpoint):
            raise ValueError("the entry names another checkpoint, torch or engine")
        if path.stat().st_size != record["size"]:
            raise ValueError("size differs from the sidecar's")
        digest: dict[str, str] = {}
        hasher = threading.Thread(target=lambda: digest.update(sha=_sha256(path)), daemon=True)
        hasher.start()  # checked beside the load (the packing below is most of its time)
        model = _int8_skeleton(checkpoint)
        try:
            with warnings_quiet():
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                if not _shapes_match(model, state):
                    raise ValueError("a weight of another shape")
                model.load_state_dict(state, strict=True, assign=True)
        finally:
            hasher.join()
        if digest.get("sha") != record["sha256"]:
            raise ValueError("content differs from the sidecar's SHA-256")
        if not _fill_buffers(model):
            raise ValueError("meta tensors left after loading")
    except FileNotFoundError:
        return None
    except Exception as exc:  # corrupt, truncated, another layout: quantise again
        log.info("int8 text-tower cache entry %s not used (%s); quantising again", path, exc)
        return None
    _count("int8-cache")
    return model.eval()


@contextlib.contextmanager
def warnings_quiet():
    """torch's TypedStorage / quantised-tensor deprecation notices while loading an entry."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def save_int8(cache_dir: Path, checkpoint: Checkpoint, model: torch.nn.Module) -> bool:
    """Keep the quantised tower for later runs, atomically and owner-only; a failure only
    costs quantising again next time."""
    path = int8_entry(cache_dir, checkpoint)
    tmp_names: list[str] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".int8-", suffix=".tmp",
                                         delete=False) as tmp:
            tmp_names.append(tmp.name)
            torch.save(model.state_dict(), tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o600)
        record = {**_identity(checkpoint), "size": os.path.getsize(tmp.name),
                  "sha256": _sha256(Path(tmp.name))}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".int8-", suffix=".tmp",
                                         delete=False) as side:
            tmp_names.append(side.name)
            json.dump(record, side)
        os.chmod(side.name, 0o600)
        os.replace(tmp.name, path)
        os.replace(side.name, path.with_suffix(".json"))
        return True
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        log.info("int8 text-tower cache entry %s not written (%r)", path, exc)
        for name in tmp_names:
            with contextlib.suppress(OSError):
                os.unlink(name)
        return False


def load_text_tower(checkpoint: Checkpoint, device: torch.device, precision: str,
                    cache_dir: Path | None = None) -> tuple[torch.nn.Module, str]:
    """The text tower ready to run (``acceleration.prepare_model``), and how it was obtained:
    ``int8-cache`` (the cached quantised tower), ``int8-quantised`` (quantised now, and kept
    when ``cache_dir`` is given), ``loaded`` (fp32 / bf16)."""
    from . import acceleration

    try:
        if precision == "int8" and cache_dir is not None:
            cached = load_int8_cached(cache_dir, checkpoint)
            if cached is not None:
                return acceleration.prepare_model(cached, device, "fp32"), "int8-cache"
        model = acceleration.prepare_model(load_text_model(checkpoint), device, precision)
    except ModelUnavailableError:
        raise
    except Exception as exc:
        raise ModelUnavailableError(
            f"cannot load the text tower of {checkpoint.name!r} ({checkpoint.path}): {exc}"
        ) from None
    if precision == "int8":
        if cache_dir is not None:
            save_int8(cache_dir, checkpoint, model)
        return model, "int8-quantised"
    return model, "loaded"
