"""Settings: one object, resolved in one place, that every command and the server are given.

Precedence, lowest first: the defaults here < a TOML settings file ($MEDSEARCH_CONFIG, else
./medsearch.toml if present) < MEDSEARCH_<NAME> environment variables < command-line flags.
`config/medsearch.toml` in the repository documents the defaults; a test keeps it equal to them.
No other module reads the environment for these values: they are passed down from here.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrieval.errors import InputError
from retrieval.model.names import DEFAULT_MODEL
from retrieval.phi import PhiPolicy
from retrieval.userdirs import cache_home, key_home

ENV_PREFIX = "MEDSEARCH_"


class Settings(BaseModel):
    """What a run is configured with; ``Settings()`` alone is the code's defaults.

    A plain model, not pydantic-settings' BaseSettings: :meth:`resolve` layers the file and the
    environment itself, and the command line answers sooner without that import (~30 ms)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    model: str = DEFAULT_MODEL
    store: str = "medsearch-store"
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    batch_size: int = 8                  # images per forward pass (CUDA: at least what fits memory)
    precision: str = "auto"              # auto | fp32 | bf16 | int8 (CPU) — see retrieval/model/acceleration.py
    compile: bool = False                # torch.compile the vision tower (pays off on long GPU runs)
    cuda_bf16: Literal["weights", "autocast"] = "weights"  # how bf16 runs on CUDA
    workers: int | None = None           # decode processes; None = cores - 1 (at most 8)
    threads: int | None = None           # CPU threads for the model; None = one per core
    frames: str = "middle"               # multi-frame policy: all | first | middle | N
    phi_policy: PhiPolicy = "hash"
    phi_key_file: str | None = None      # None: one key per store in key_folder
    phi_key_dir: Path | None = None      # None: $XDG_CONFIG_HOME/medsearch/keys
    redact_paths: Literal["none", "name", "hash"] = "none"  # folder names in results and exports
    index_type: str = "auto"             # a FAISS factory string, or auto (by size and memory)
    k: int = 10
    engine: Literal["local", "ray"] = "local"  # index: this machine's processes, or a Ray cluster
    ray_address: str = "local"           # engine ray: local (a cluster in this process) | auto | ray://HOST:PORT
    ray_actors: int | None = None        # engine ray: embedding actors; None = one per GPU, else 1 (CPU)
    cache_dir: Path | None = None        # None: $XDG_CACHE_HOME/medsearch
    text_runtime: Literal["torch", "onnx"] = "torch"  # onnx: the text tower exported to ONNX int8
    db: str | None = None                # postgresql+psycopg://USER@HOST[:PORT]/DB; None: SQLite in the store
    # A PACS to pull from (index dicomweb+http(s)://…, index dimse://…): how to reach it
    pacs_calling_aet: str = "MEDSEARCH"  # DIMSE: our AE title (the PACS must know it)
    pacs_timeout: float = 30.0           # seconds for one network step (connect, an answer)
    pacs_user: str | None = None         # DICOMweb: HTTP basic user
    pacs_password: str | None = Field(default=None, repr=False)  # DICOMweb: its password
    pacs_token: str | None = Field(default=None, repr=False)     # DICOMweb: a bearer token
    pacs_tls: bool = False               # DIMSE over TLS (index dimse://; receive: --tls-cert)
    pacs_tls_ca: str | None = None       # CA bundle that signed the PACS's certificate
    pacs_tls_cert: str | None = None     # our certificate for pulls (mutual TLS)
    pacs_tls_key: str | None = None      # its private key

    @classmethod
    def resolve(cls, **flags: Any) -> "Settings":
        """The settings of this run: file, then environment, then ``flags`` (the command
        line; None means "not given"). An invalid value is an :class:`InputError` naming the
        setting and where it came from."""
        origin: dict[str, str] = {}
        values: dict[str, Any] = {}
        path = config_path()
        env = environment()
        layers = [(f"settings file {path}", read_file(path) if path else {}),
                  *[(f"environment variable {ENV_PREFIX}{name.upper()}", {name: value})
                    for name, value in env.items()],
                  ("command line", {k: v for k, v in flags.items() if v is not None})]
        for where, layer in layers:
            for name, value in layer.items():
                values[name], origin[name] = value, where
        try:
            return cls(**values)
        except ValidationError as exc:
            raise InputError(_explain(exc, origin)) from None

    @property
    def cache_folder(self) -> Path:
        """Where measured facts about this machine are cached (the CPU precision probe)."""
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        return cache_home()

    @property
    def key_folder(self) -> Path:
        """Where per-store patient-key files live (outside every store)."""
        if self.phi_key_dir is not None:
            return Path(self.phi_key_dir).expanduser()
        return key_home()

    @property
    def key_file(self) -> Path | None:
        """One shared patient-key file for every store, or None for one key per store."""
        return Path(self.phi_key_file).expanduser() if self.phi_key_file else None


def environment() -> dict[str, str]:
    """The settings given as MEDSEARCH_<NAME> variables (the name in any case), as text."""
    known = {f"{ENV_PREFIX}{name}".lower(): name for name in Settings.model_fields}
    return {known[key.lower()]: value for key, value in os.environ.items()
            if key.lower() in known}


def config_path() -> Path | None:
    """The settings file in effect: $MEDSEARCH_CONFIG, else ./medsearch.toml, else none."""
    if os.environ.get(f"{ENV_PREFIX}CONFIG"):
        return Path(os.environ[f"{ENV_PREFIX}CONFIG"])
    local = Path("medsearch.toml")
    return local if local.is_file() else None


def read_file(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read settings file {path}: {exc}") from None


def _explain(exc: ValidationError, origin: dict[str, str]) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error.get("loc") else "?"
        where = origin.get(name, "defaults")
        if error.get("type") == "extra_forbidden":
            problems.append(f"unknown setting {name!r} ({where}); known: "
                            + ", ".join(Settings.model_fields))
        else:
            problems.append(f"invalid setting {name} = {error.get('input')!r} ({where}): "
                            f"{error['msg']}")
    return "; ".join(problems)
