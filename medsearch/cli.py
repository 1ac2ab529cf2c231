"""Entry point: one typer app; each command group lives in its own module under commands/."""

from __future__ import annotations

import json
import sys

import click
import typer

from retrieval.errors import MedsearchError

app = typer.Typer(
    name="medsearch",
    help="Search medical images by text and find similar cases (MedSigLIP + FAISS + SQLite).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registration by import: each module adds its commands to `app`.
from .commands import classify, core, demo, dicom, maintenance, serve  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        app(args=args, standalone_mode=False, prog_name="medsearch")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except MedsearchError as exc:
        _fail(str(exc), type(exc).__name__, as_json)
    except KeyboardInterrupt:
        _fail("interrupted; committed work is kept and the next run resumes", "Interrupted",
              as_json, code=130)


def _fail(message: str, kind: str, as_json: bool, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "type": kind}))
    sys.exit(code)

