"""Schemathesis hooks for the API fuzz run (loaded with SCHEMATHESIS_HOOKS=benchmarks.api_fuzz_checks).

The built-in ``positive_data_acceptance`` wants every schema-valid request answered 2xx or
404. Three refusals of schema-valid requests are right and no schema can state them, so this
check replaces it and admits exactly those:

- 400 ``InputError`` whose message is about the query expression's grammar or meaning (an
  unclosed quote, terms that cancel out), labels that repeat once stripped, or more
  labels × templates than one request may cost;
- 415 ``UnsupportedMedia``: the uploaded bytes are not a PNG, JPEG or DICOM file;
- 422 ``UndecodableImage``: an upload of a known kind that does not decode.

Anything else, notably 422 ``ValidationError`` (the server and its schema disagree) or a 400
for an empty query, fails the run. Before judging, the body is checked against the schema
here too: schemathesis's coverage phase sometimes labels as valid a multipart body that breaks
a top-level ``oneOf`` (labels and preset together), and such a body is not held against the
server.
"""

from __future__ import annotations

import json

import jsonschema_rs
import schemathesis
from schemathesis.specs.openapi.checks import negative_data_rejection

#: Beginnings of the 400 messages that are about a query's or labels' content, not its shape.
CONTENT_ERRORS = (
    "query has ", "a quoted query term is empty", "query term ", "a query may have at most",
    "every query term has weight 0", "the query's terms cancel", "query ends with an operator",
    "label(s) given twice", "give at least two labels", "too many prompts",
    "region ", "a region applies to one query image",
    "relevant lists an id more than once", "not_relevant lists an id more than once",
    "min_prob applies to text-only queries", "no indexed image with id",
)
#: Content refusals whose message names the offending value first.
CONTENT_FRAGMENTS = ("is marked both relevant and not relevant",)
ADMITTED = {(415, "UnsupportedMedia"), (422, "UndecodableImage"), (409, "Conflict")}


def _error(response) -> tuple[str, str]:
    try:
        body = json.loads(response.content)
        return str(body.get("type", "")), str(body.get("error", ""))
    except (ValueError, AttributeError):
        return "", ""


def _plain(value):
    """The body as plain JSON values; an upload (bytes, schemathesis's Binary) as a string."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value is None or type(value) in (str, int, float, bool):
        return value
    return "<file>"


def _params_allowed(case, raw: dict, operation: dict) -> bool:
    """Whether every path and query parameter the case sends is valid under its schema."""
    sent = {"path": case.path_parameters or {}, "query": case.query or {}}
    for param in operation.get("parameters", []):
        values = sent.get(param.get("in"), {})
        if param["name"] in values:
            validator = jsonschema_rs.validator_for({**param.get("schema", {}),
                                                     "components": raw.get("components", {})})
            if not validator.is_valid(_plain(values[param["name"]])):
                return False
    return True


def _schema_allows(case, whole: bool = False) -> bool:
    """Whether the case's body (and with ``whole`` its parameters too) really is valid under
    its operation's schema."""
    body = case.body
    if not isinstance(body, dict) or not case.media_type:
        return not whole
    raw = case.operation.schema.raw_schema
    operation = raw["paths"][case.operation.path][case.method.lower()]
    if whole and not _params_allowed(case, raw, operation):
        return False
    content = operation.get("requestBody", {}).get("content", {}).get(case.media_type, {})
    if "schema" not in content:
        return not whole
    as_json = _plain(body)
    if case.media_type.startswith("multipart/"):
        # A form field is text on the wire: false sent as a string field is the text "false",
        # an object the JSON text "{}" (as schemathesis encodes it), which is a valid string.
        props = content["schema"].get("properties", {})
        for name, value in as_json.items():
            if (props.get(name, {}).get("type") == "string"
                    and isinstance(value, (bool, int, float, dict, list))):
                as_json[name] = json.dumps(value)
    validator = jsonschema_rs.validator_for({**content["schema"],
                                             "components": raw.get("components", {})})
    return validator.is_valid(as_json)


@schemathesis.check
def accepted_when_valid(ctx, response, case):
    """A request the schema allows is answered 2xx or 404, or refused for its content only."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if 200 <= status < 300 or status == 404:
        return None
    kind, message = _error(response)
    if not _schema_allows(case):
        return None
    if (status, kind) in ADMITTED:
        return None
    if status == 400 and kind == "InputError" and (
            message.startswith(CONTENT_ERRORS) or any(f in message for f in CONTENT_FRAGMENTS)):
        return None
    raise AssertionError(f"a request the schema allows was refused: {status} {kind}: "
                         f"{message[:300]}")


@schemathesis.check
def refused_when_invalid(ctx, response, case):
    """The built-in negative-data check, except where the "invalid" request is valid after all:
    schemathesis's multipart mutations sometimes send a body that still meets the schema (an
    empty field dropped, a pattern still matched); such a body is checked here again."""
    try:
        return negative_data_rejection(ctx, response, case)
    except AssertionError:
        if _schema_allows(case, whole=True):
            return None
        raise
