"""The one mapping of medsearch's errors to HTTP statuses and JSON error bodies."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval.errors import (ConflictError, InputError, MedsearchError, ModelMismatchError,
                              ModelUnavailableError, NotFoundError, StoreError,
                              UndecodableImageError)


class UnsupportedMedia(MedsearchError):
    """An upload whose bytes are not PNG, JPEG or DICOM (415)."""


class InvalidBody(MedsearchError):
    """A body outside the bounds the schema states (422, as any schema violation)."""


class JsonTooLarge(MedsearchError):
    """A JSON body over the JSON size limit (413)."""


#: (error class, status, the ``type`` clients see), most specific first. The ``type`` names
#: are part of the API (clients and benchmarks/api_fuzz_checks.py match them). A store built
#: with another checkpoint is the server's configuration, not the request's fault: 503.
STATUS: list[tuple[type[MedsearchError], int, str | None]] = [
    (NotFoundError, 404, "NotFound"),
    (ConflictError, 409, "Conflict"),
    (UnsupportedMedia, 415, None),
    (UndecodableImageError, 422, "UndecodableImage"),
    (InvalidBody, 422, "ValidationError"),
    (JsonTooLarge, 413, "PayloadTooLarge"),
    (ModelMismatchError, 503, None),
    (ModelUnavailableError, 503, None),
    (StoreError, 503, None),
    (InputError, 400, None),
    (MedsearchError, 400, None),
]


def status_of(exc: MedsearchError) -> tuple[int, str]:
    """The HTTP status and the error ``type`` of a medsearch error."""
    status, kind = next((code, kind) for cls, code, kind in STATUS if isinstance(exc, cls))
    return status, kind or type(exc).__name__


def error_response(status: int, message: str, kind: str,
                   headers: dict | None = None) -> JSONResponse:
    """Every error has this body: a sentence that says what to do, and a machine-readable kind."""
    return JSONResponse({"error": message, "type": kind}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer medsearch errors, schema violations and HTTP errors with the one error body."""

    @app.exception_handler(MedsearchError)
    async def _medsearch_error(_request: Request, exc: MedsearchError):
        status, kind = status_of(exc)
        return error_response(status, str(exc), kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return error_response(400, "the request body is not valid JSON", "InputError")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors())
        return error_response(422, f"invalid request: {problems}", "ValidationError")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # a path served by several routes: name all their methods
            methods = sorted({m for route in request.app.router.routes
                              if getattr(route, "path_regex", None) is not None
                              and route.path_regex.match(request.url.path)
                              for m in getattr(route, "methods", None) or ()})
            if methods:
                headers = {**(headers or {}), "Allow": ", ".join(methods)}
        return error_response(exc.status_code, str(exc.detail), "HTTPError", headers)
