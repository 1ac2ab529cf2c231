"""The OpenAPI document: request bodies the routes read themselves (JSON or multipart), every
error a route can give, and the token's security schemes. It states what the server requires
(tests/reliability/test_api_fuzz.py runs schemathesis against it)."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from .bodies import ClassifyUploadFields, ErrorBody, UploadFields


def multipart_body(fields: type[BaseModel]) -> dict:
    """The multipart body: a ``file`` and the model's fields; objects and lists travel as JSON."""
    schema = fields.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    schema.pop("title", None)
    properties = {}
    for name, prop in schema["properties"].items():  # a form field is text or absent, never null
        options = [o for o in prop.pop("anyOf", []) if o != {"type": "null"}]
        if len(options) == 1:
            prop.update(options[0])
        elif options:
            prop["anyOf"] = options
        if prop.get("default", 0) is None:
            del prop["default"]
        properties[name] = prop
    schema["properties"] = {"file": {"type": "string", "format": "binary", "minLength": 1,
                                     "description": "PNG, JPEG or DICOM (judged by its bytes)"},
                            **properties}
    schema["required"] = ["file", *schema.get("required", [])]
    schema["additionalProperties"] = False
    # filters is one JSON part; templates are one text part each (repeat the field)
    encoding = {"filters": {"contentType": "application/json"}} if "filters" in properties else {}
    return {"schema": schema, "encoding": encoding}


def query_body(json_model: type[BaseModel]) -> dict:
    """A query route's body: ``json_model`` as JSON, or an upload with its form fields."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
        "multipart/form-data": multipart_body(UploadFields)}}}


def classify_body() -> dict:
    """/classify's body: ClassifyBody as JSON, or an upload with its form fields."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyBody"}},
        "multipart/form-data": multipart_body(ClassifyUploadFields)}}}


ERRORS = {
    400: "A request the schema allows but whose content cannot be used: a query expression "
         "that does not parse or whose terms cancel out, labels that repeat, a bad date",
    401: "Missing or wrong token (only when the server has one)",
    403: "A cross-site request (its Origin names another site)",
    404: "No indexed image with that id, or its source can no longer be read, or no cohort "
         "of that name",
    409: "A cohort of that name exists (send \"replace\": true to replace it)",
    413: "The body is over the upload limit (JSON bodies: over 1 MiB)",
    415: "The upload is not a PNG, JPEG or DICOM file (judged by its bytes)",
    421: "The Host header names a host this server does not answer to",
    422: "The request does not match the schema, or the upload cannot be decoded",
    503: "The model or the store is not available",
}


def responses(*codes: int) -> dict:
    """OpenAPI responses: every error this route can give, all with the ErrorBody shape."""
    return {code: {"model": ErrorBody, "description": ERRORS[code]} for code in codes}


ALWAYS = (401, 403, 413, 421)


def json_request_body(model: type[BaseModel]) -> dict:
    """A JSON request body of ``model`` (routes that read JSON themselves)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}



def document_bodies(app: FastAPI, models: list[type[BaseModel]], secured: bool) -> None:
    """Put the JSON bodies that routes read themselves (JSON or multipart) into the schema,
    and, when a token is set, the two ways of sending it (every route but /health)."""
    from fastapi.openapi.utils import get_openapi

    def build() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, sub in body.pop("$defs", {}).items():
                    components.setdefault(name, sub)
                components.setdefault(model.__name__, body)
            if secured:
                schema["components"]["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "basic": {"type": "http", "scheme": "basic",
                              "description": "any user name, the token as password"}}
                schema["security"] = [{"bearer": []}, {"basic": []}]
                schema["paths"]["/health"]["get"]["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build
