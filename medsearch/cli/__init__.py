"""The command line: a typer app of thin commands (parse flags, resolve settings, call the core, print)."""

from .main import app, main, run

__all__ = ["app", "main", "run"]
