"""Reading request payloads: JSON bodies within their size and depth limits, and multipart
uploads, whose kind is recognised by their bytes (never by their name)."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from retrieval.errors import InputError

from ..app import QuerySpec
from ..decoders import sniff
from .bodies import UploadFields, spec_from_upload
from .errors import InvalidBody, JsonTooLarge, UnsupportedMedia
from .guard import BodyTooLarge

#: JSON bodies are small (uploads are multipart): bounds on their size and nesting.
MAX_JSON_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 16


def json_depth(data, limit: int) -> int:
    """Nesting depth of parsed JSON, without recursion (stops once past ``limit``)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return deepest


async def json_body(request: Request) -> dict:
    """The JSON object of a request, within MAX_JSON_BYTES and MAX_JSON_DEPTH."""
    raw = await request.body()
    if len(raw) > MAX_JSON_BYTES:
        raise JsonTooLarge(f"JSON body over {MAX_JSON_BYTES} bytes; images go as multipart "
                           "uploads")
    try:
        data = json.loads(raw or b"null")
    except RecursionError:
        raise InvalidBody(f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} "
                          "levels)") from None
    except (ValueError, UnicodeDecodeError):
        raise InputError("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON object")
    if json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise InvalidBody(f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return data


def validated(model: type[BaseModel], data: dict) -> BaseModel:
    """``data`` as ``model``; a violation is answered as FastAPI answers any (422)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def upload_spec(request: Request) -> QuerySpec:
    """A multipart body: one ``file`` (PNG, JPEG or DICOM, by its bytes) and optional fields."""
    content, kind, fields = await read_upload(request)
    return spec_from_upload(content, kind, validated(UploadFields, fields))


async def read_upload(request: Request) -> tuple[bytes, str, dict]:
    """The uploaded ``file`` (checked by its bytes), its kind, and the other form fields."""
    try:
        form = await request.form(max_files=1, max_fields=24)  # 8 templates + the rest
    except BodyTooLarge:
        raise
    except Exception as exc:
        raise InputError(f"the multipart body could not be read: {exc}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise InputError("the multipart body needs a 'file' part with the image")
    content = await upload.read()
    if not content:
        raise InputError("the uploaded file is empty")
    kind = sniff(content)
    if kind is None:
        raise UnsupportedMedia("the upload is not a PNG, JPEG or DICOM file (checked by its "
                               "content, not its name)")
    fields: dict = {}
    templates = [v for k, v in form.multi_items() if k == "templates" and isinstance(v, str)]
    seen = [k for k, _ in form.multi_items() if k != "templates"]
    repeated = sorted({k for k in seen if seen.count(k) > 1})
    if repeated:
        raise InvalidBody(f"the multipart field {repeated[0]!r} is given more than once")
    for key, value in form.multi_items():
        if key == "file":
            continue
        if not isinstance(value, str):
            raise InputError(f"the multipart part {key!r} must be a text field, not a file")
        if key == "templates":
            continue
        if key == "filters":
            if len(value) > MAX_JSON_BYTES:
                raise JsonTooLarge(f"the {key!r} field is over {MAX_JSON_BYTES} bytes")
            try:
                value = json.loads(value)
            except RecursionError:
                raise InvalidBody(f"the {key!r} field is nested too deeply") from None
            except ValueError:
                raise InputError(f"the {key!r} field must be JSON") from None
            if json_depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
                raise InvalidBody(f"the {key!r} field is nested too deeply")
        fields[key] = value
    if templates:
        fields["templates"] = _form_templates(templates)
    return content, kind, fields


def _form_templates(parts: list[str]) -> list[str]:
    """Templates as form fields: one part per template; one part holding a JSON list of
    strings is read as that list (some clients send them so)."""
    if len(parts) == 1 and parts[0].lstrip().startswith("["):
        try:
            value = json.loads(parts[0])
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, list) and all(isinstance(t, str) for t in value):
            return value
    return parts


def is_multipart(request: Request) -> bool:
    """Whether the body is a multipart upload (else it is read as JSON)."""
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")

