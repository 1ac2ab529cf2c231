"""Settings: defaults here, overridden by a TOML file, then MEDSEARCH_* environment variables.

`config/medsearch.toml` in the repository is the documented default file; a test keeps it equal
to these defaults. A file is read from $MEDSEARCH_CONFIG, else ./medsearch.toml if present.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from retrieval.errors import InputError
from retrieval.model import DEFAULT_MODEL


class Settings(BaseModel, extra="forbid"):
    model: str = DEFAULT_MODEL
    store: str = "medsearch-store"
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    batch_size: int = 8                  # images per forward pass (CUDA: at least what fits memory)
    precision: str = "auto"              # auto | fp32 | bf16 | int8 (CPU) — see retrieval/acceleration.py
    compile: bool = False                # torch.compile the vision tower (pays off on long GPU runs)
    workers: int | None = None           # decode processes; None = cores - 1 (at most 8)
    frames: str = "middle"               # multi-frame policy: all | first | middle | N
    phi_policy: Literal["hash", "keep", "drop"] = "hash"
    phi_key_file: str | None = None      # None: one key per store in $XDG_CONFIG_HOME/medsearch/keys
    redact_paths: Literal["none", "name", "hash"] = "none"  # folder names in results and exports
    index_type: str = "auto"             # a FAISS factory string, or auto (by size and memory)
    k: int = 10


def config_path() -> Path | None:
    if os.environ.get("MEDSEARCH_CONFIG"):
        return Path(os.environ["MEDSEARCH_CONFIG"])
    local = Path("medsearch.toml")
    return local if local.is_file() else None


def load_settings(path: Path | None = None) -> Settings:
    path = path or config_path()
    data: dict = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InputError(f"cannot read settings file {path}: {exc}") from None
    for name in Settings.model_fields:
        env = os.environ.get(f"MEDSEARCH_{name.upper()}")
        if env is not None:
            data[name] = env
    try:
        return Settings(**data)
    except ValidationError as exc:
        where = f"settings file {path}" if path else "MEDSEARCH_* environment"
        raise InputError(f"invalid {where}: {exc}") from None
