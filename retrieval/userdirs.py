"""The per-user folders medsearch keeps outside every store (XDG base directories): the one
place besides the settings that reads the environment, so library use without a settings
object finds the same folders as the command line."""

from __future__ import annotations

import os
from pathlib import Path


def config_home() -> Path:
    """``$XDG_CONFIG_HOME/medsearch`` (default ``~/.config/medsearch``): patient-key files."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "medsearch"


def key_home() -> Path:
    """``$XDG_CONFIG_HOME/medsearch/keys``: one patient-key file per store, by default."""
    return config_home() / "keys"


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/medsearch`` (default ``~/.cache/medsearch``): measured machine facts."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medsearch"


def runtime_home() -> Path:
    """``$XDG_RUNTIME_DIR/medsearch`` (default ``$XDG_CACHE_HOME/medsearch/run``): where a running
    server says where it listens, for the command line to find it."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "medsearch" if runtime else cache_home() / "run"
