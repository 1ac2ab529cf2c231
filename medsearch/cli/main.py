"""Entry point: one typer app; each command group lives in its own module beside it."""

from __future__ import annotations

import gc
import json
import sys

import click
import typer

from retrieval.errors import (InputError, MedsearchError, ModelMismatchError,
                              ModelUnavailableError, NotFoundError, StoreError,
                              UndecodableImageError)


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """``name`` from click and from the click that typer uses (typer >= 0.29 vendors its own
    copy, whose exceptions are not click's): usage errors must be caught from either."""
    found = {getattr(click.exceptions, name)}
    vendored = next((c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"), None)
    if vendored is not None:
        found.add(getattr(__import__(vendored.__module__, fromlist=[name]), name, click.ClickException))
    if name in ("Exit", "Abort"):
        found.add(getattr(typer, name))
    return tuple(found)


_EXIT, _ABORT, _CLICK_ERROR = (_click_classes(n) for n in ("Exit", "Abort", "ClickException"))

#: The exit status of each core error, most specific first: the one place they are mapped.
#: All are 2 (the documented "could not do it" status); scripts tell them apart by the JSON
#: document's "type".
EXIT_CODES: list[tuple[type[MedsearchError], int]] = [
    (NotFoundError, 2), (UndecodableImageError, 2), (InputError, 2),
    (ModelMismatchError, 2), (StoreError, 2), (ModelUnavailableError, 2), (MedsearchError, 2),
]

app = typer.Typer(
    name="medsearch",
    help="Search medical images by text and find similar cases (MedSigLIP + FAISS + SQLite).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Registration by import: each module adds its commands to `app`.
from . import (classify, cohort, core, demo, duplicates, forget, maintenance, preview,  # noqa: E402,F401
               receive, serve)


def run() -> None:
    """The process's entry point (the `medsearch` script, `python -m medsearch`): :func:`main`,
    then an exit that skips the garbage collector's last pass over every object the imports
    made (~0.3 s of a one-shot command's ~1 s with SQLAlchemy and FAISS loaded). Exit still
    runs atexit handlers and flushes the standard streams; files are closed by the commands.
    Not in :func:`main`, which tests call in-process: frozen objects are never collected."""
    try:
        main()
    finally:
        gc.freeze()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        _command_app(args)(args=args, standalone_mode=False, prog_name="medsearch")
    except _EXIT as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except _ABORT:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except _CLICK_ERROR as exc:  # a usage error: the message and usage line, no traceback
        exc.show()
        if as_json:
            print(json.dumps({"error": exc.format_message(), "type": "UsageError"}))
        sys.exit(exc.exit_code)
    except MedsearchError as exc:
        _fail(_with_option(exc), type(exc).__name__, as_json, exit_code(exc))
    except KeyboardInterrupt:
        _fail("interrupted; committed work is kept and the next run resumes", "Interrupted",
              as_json, code=130)


def _command_app(args: list[str]) -> typer.Typer:
    """``app`` with only the command that ``args`` name, when they name one: typer builds the
    parameters of every registered command before it runs any (~25 ms of a served command's
    ~0.25 s). Still a group (a no-op callback), so usage lines, errors and exit codes are the
    full app's; anything else (no command, a group, a typo, --help) gets the full app."""
    chosen = [c for c in app.registered_commands if args and c.name == args[0]]
    if not chosen:
        return app
    one = typer.Typer(name=app.info.name, help=app.info.help, no_args_is_help=True,
                      add_completion=False, pretty_exceptions_enable=False)
    one.registered_commands = chosen
    one.callback()(lambda: None)
    return one


def exit_code(exc: MedsearchError) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))


def _with_option(exc: MedsearchError) -> str:
    """The core's message, with the command-line option for the setting it names."""
    setting = getattr(exc, "setting", None)
    return f"{exc} (--{setting.replace('_', '-')})" if setting else str(exc)


def _fail(message: str, kind: str, as_json: bool, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "type": kind}))
    sys.exit(code)

