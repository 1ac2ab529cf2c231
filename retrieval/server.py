"""The HTTP service: search, similar cases, export, previews and the web page over one store.

``create_app`` builds a FastAPI app for a store. The towers load once, when the app is made;
each tower is used under its own lock (torch modules are not safe to share between threads
mid-forward) and the FAISS index under a third, so a text search never waits behind an image
upload's encoding. An index run in another process may write to the same store meanwhile:
every request checks SQLite's ``PRAGMA data_version`` (one cheap statement) and reconciles the
in-memory index when rows were committed.

``retrieval`` never imports ``indexer``, so decoding is injected: ``decode_upload`` turns an
uploaded file's bytes into the model's input tensor and ``decode_stored`` does the same for an
indexed path (for previews). The CLI wires both from ``indexer``. No path from a request ever
reaches the filesystem: previews decode only paths read from the store by id.

Security (see README): only the Host names in the allowlist are served (loopback names, the
bound address, ``--allowed-host``; others get 421 before any route runs, so a page that
rebinds its DNS name to 127.0.0.1 reads nothing) and requests whose Origin names another site
get 403; a bearer token (or HTTP Basic with the token as password, for browsers) guards every
route but ``/health`` when set; bodies over the upload limit are answered 413 from
Content-Length or as soon as the streamed count passes it, JSON bodies over 1 MiB or nested
deeper than 16 levels are refused; uploads are recognised by their bytes; errors are JSON
without tracebacks; query text, request data and exception messages are never logged.
The OpenAPI schema states what the server requires (tests/reliability/test_api_fuzz.py runs
schemathesis against it).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import os
import re
import sqlite3
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi import Path as FastPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, BeforeValidator, ConfigDict, WithJsonSchema, Field, ValidationError, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import export as cohort
from .errors import InputError, MedsearchError, ModelUnavailableError, StoreError
from .filters import GLOB_PATTERN, MAX_GLOB_LENGTH, Filters
from .query import MAX_TERMS, Term, parse_query
from .privacy import KeyFiles
from .search import Result, Searcher
from .store import DATABASE, Store

log = logging.getLogger("medsearch.server")

DEFAULT_MAX_UPLOAD = 64 * 1024 * 1024
#: Ids are SQLite INTEGERs (signed 64-bit); a larger one cannot name an image.
MAX_ID = 2 ** 63 - 1
#: Zero-shot labels per request, counted after splitting on commas (each label is a text
#: forward pass under the text lock).
MAX_LABELS = 200
MAX_LABEL_LENGTH = 200
MAX_TEMPLATES = 8
#: Each label × template is one text forward pass under the text lock.
MAX_PROMPTS = 400
#: JSON bodies are small (uploads are multipart): bounds on their size and nesting.
MAX_JSON_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 16
#: Host names a loopback server answers to when not told otherwise (DNS rebinding).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
STATIC = Path(__file__).parent / "static"
#: (content, kind "png" | "jpeg" | "dicom", model image size) → 3×S×S float32 model input.
DecodeUpload = Callable[[bytes, str, int], np.ndarray]
#: (indexed path, frame number, model image size) → 3×S×S float32 model input.
DecodeStored = Callable[[str, int, int], np.ndarray]


# -- errors ------------------------------------------------------------------------------------
class NotFound(MedsearchError):
    """An id that is not in the store (404)."""


class UnsupportedMedia(MedsearchError):
    """An upload whose bytes are not PNG, JPEG or DICOM (415)."""


class UndecodableImage(MedsearchError):
    """An upload of a known kind that cannot be decoded (422)."""


class InvalidBody(MedsearchError):
    """A body outside the bounds the schema states (422, as any schema violation)."""

    kind = "ValidationError"


class JsonTooLarge(MedsearchError):
    """A JSON body over MAX_JSON_BYTES (413)."""

    kind = "PayloadTooLarge"


_STATUS = [(NotFound, 404), (UnsupportedMedia, 415), (UndecodableImage, 422), (InvalidBody, 422),
           (JsonTooLarge, 413),
           (ModelUnavailableError, 503), (StoreError, 503), (InputError, 400),
           (MedsearchError, 400)]


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status, headers=headers)


# -- uploads -----------------------------------------------------------------------------------
def sniff(data: bytes) -> str | None:
    """What an upload is, by its first bytes (never by its name)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    # DICOM without preamble: starts with a little-endian group 0002 or 0008 element whose
    # VR (explicit) is two capital letters, or with an implicit-VR length.
    if len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[3:4] == b"\x00":
        return "dicom"
    return None


# -- request and response bodies ---------------------------------------------------------------
# JSON bodies are validated strictly (no `false` for a number, no "5" for an integer) so that
# the server accepts exactly what the published schema allows; multipart form fields are text
# and are converted as before.
_JSON = ConfigDict(extra="forbid", strict=True)
_DATE = r"^(?:[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{8})$"
#: "Has a character that is not white space", spelled out: Python's, ECMA's and Rust's \s
#: differ (\x1c-\x1f, \x85, \ufeff), so the schema and the server use this one class.
_SPACE = "\\x09-\\x0d\\x20\\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff"
_NOT_BLANK = f"[^{_SPACE}]"


def _integral(value):
    """JSON has one number type: 12.0 is the integer 12 (as JSON Schema says); true is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _json_int(low: int, high: int):
    """An integer field of a JSON body within [low, high] (the bounds stay in the schema)."""
    return Annotated[Annotated[int, Field(ge=low, le=high)], BeforeValidator(_integral)]


ImageId = _json_int(0, MAX_ID)


def _digits(value):
    """A URL's integer is digits only ("3\n" or " 3" is not 3, whatever int() says)."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]+", value):
        raise ValueError("must be an integer written in digits")
    return value


PathId = Annotated[Annotated[int, Field(ge=0, le=MAX_ID)], BeforeValidator(_digits)]
PreviewSize = Annotated[Annotated[int, Field(ge=16, le=4096)], BeforeValidator(_digits)]
TopK = _json_int(1, 1000)


def _not_blank(value: str | None, name: str) -> str | None:
    if value is not None and not re.search(_NOT_BLANK, value):
        raise ValueError(f"{name} is blank")
    return value


#: One value or a list of them (a single schema: a union of the two confuses schema readers).
OneOrMany = Annotated[list[str] | str | None, WithJsonSchema(
    {"type": ["array", "string", "null"], "items": {"type": "string"}})]


class ErrorBody(BaseModel):
    """Every error: a sentence that says what to do, and a machine-readable kind."""

    error: str
    type: str


class FiltersBody(BaseModel):
    """Metadata filters; lists match any of their values."""

    model_config = ConfigDict(extra="forbid", strict=True)

    modality: OneOrMany = None
    body_part: OneOrMany = None
    date_from: str | None = Field(None, description="YYYY-MM-DD or YYYYMMDD",
                                  json_schema_extra={"pattern": _DATE})
    date_to: str | None = Field(None, description="YYYY-MM-DD or YYYYMMDD",
                                json_schema_extra={"pattern": _DATE})
    path_glob: str | None = Field(None, max_length=MAX_GLOB_LENGTH, pattern=GLOB_PATTERN,
                                  description="SQLite GLOB over the indexed path (at most "
                                              f"{MAX_GLOB_LENGTH} characters, 64 wildcards)")
    label: OneOrMany = None
    min_label_score: float | None = None

    @field_validator("date_from", "date_to")
    @classmethod
    def _date(cls, value: str | None) -> str | None:
        # Python's re, as the schema's readers use: "$" also matches before a final newline.
        if value is not None and not re.search(_DATE, value):
            raise ValueError("a date is YYYY-MM-DD or YYYYMMDD")
        return None if value is None else value.strip()

    def to_filters(self) -> Filters:
        return Filters.from_dict(self.model_dump(exclude_none=True))


def _choice(*names: str, exactly_one: bool = True, never_together: tuple = ()):
    """JSON Schema for alternative fields: present (never null), exactly one (or at least one)
    of ``names``, and no pair of ``never_together``. Models using it refuse explicit nulls
    for these fields (see _NoNulls), so "present" means the same to the schema and the server."""

    def extra(schema: dict, _model=None) -> None:
        for name in names:
            prop = schema["properties"][name]
            options = [o for o in prop.pop("anyOf", []) if o != {"type": "null"}]
            if len(options) == 1:
                prop = schema["properties"][name] = {**options[0], **prop}  # extras win
            elif options:
                prop["anyOf"] = options
            prop.pop("default", None)
        schema["oneOf" if exactly_one else "anyOf"] = [{"required": [n]} for n in names]
        if never_together:
            schema["not"] = {"anyOf": [{"required": list(pair)} for pair in never_together]}

    return extra


class _NoNulls(BaseModel):
    """Refuses an explicit null for the alternative fields: leave them out instead."""

    _NOT_NULL: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data):
        if isinstance(data, dict):
            for name in cls._NOT_NULL:
                if name in data and data[name] is None:
                    raise ValueError(f"{name} is null; leave it out instead")
        return data


class TermBody(_NoNulls):
    """One weighted query term: a text or an indexed image id (exactly one)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_choice("text", "id"))
    _NOT_NULL = ("text", "id")

    text: str | None = Field(None, max_length=1000, json_schema_extra={"pattern": _NOT_BLANK})
    id: ImageId | None = None
    weight: float = Field(1.0, ge=-100, le=100)

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, value: str | None) -> str | None:
        return _not_blank(value, "text")

    @model_validator(mode="after")
    def _exactly_one(self) -> "TermBody":
        if (self.text is None) == (self.id is None):
            raise ValueError("each term needs exactly one of text or id")
        return self


_QUERY_DOC = ('query arithmetic, e.g. "pleural effusion" - "chest tube" or 2:"effusion" + #17 '
              "(#N is indexed image N); an expression that does not parse is answered 400")


class SearchBody(_NoNulls):
    """Text search by ``query`` (text with arithmetic) or by ``terms`` (exactly one of them)."""

    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra=_choice("query", "terms"))
    _NOT_NULL = ("query", "terms")

    query: str | None = Field(None, max_length=2000, description=_QUERY_DOC,
                              json_schema_extra={"pattern": _NOT_BLANK},
                              examples=['"pleural effusion" - "chest tube"'])
    terms: list[TermBody] | None = Field(None, min_length=1, max_length=MAX_TERMS)
    k: TopK = 10
    filters: FiltersBody | None = None
    min_score: float | None = Field(None, ge=-1.0, le=1.0)

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str | None) -> str | None:
        return _not_blank(value, "query")

    @model_validator(mode="after")
    def _query_or_terms(self):
        if (self.query is None) == (self.terms is None):
            raise ValueError("give either query (text) or terms, exactly one of them")
        return self


class SimilarBody(BaseModel):
    """Similar cases for an indexed image, optionally shifted by a query expression."""

    model_config = _JSON

    id: ImageId
    query: str | None = Field(None, max_length=2000, description="extra terms, e.g. '- \"tube\"'")
    k: TopK = 10
    filters: FiltersBody | None = None
    min_score: float | None = Field(None, ge=-1.0, le=1.0)


class ExportBody(_NoNulls):
    """What /search (``query`` or ``terms``) or /similar (``id``, with optional extra ``query``
    terms) takes; the rows of the results as a file."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_choice(
        "query", "terms", "id", exactly_one=False,
        never_together=(("terms", "query"), ("terms", "id"))))
    _NOT_NULL = ("query", "terms", "id")

    query: str | None = Field(None, max_length=2000, description=_QUERY_DOC,
                              json_schema_extra={"pattern": _NOT_BLANK})
    terms: list[TermBody] | None = Field(None, min_length=1, max_length=MAX_TERMS)
    id: ImageId | None = None
    k: TopK = 10
    filters: FiltersBody | None = None
    min_score: float | None = Field(None, ge=-1.0, le=1.0)

    @model_validator(mode="after")
    def _one_query(self):
        if self.terms is not None and (self.query is not None or self.id is not None):
            raise ValueError("terms cannot be combined with query or id")
        if self.terms is None and self.id is None and self.query is None:
            raise ValueError("give query (text), terms or id")
        _not_blank(self.query, "query")
        return self


_LABEL = r"^[^,]*$"


def _check_labels(labels: list[str]) -> list[str]:
    """Labels as the classifier will see them (split on commas), within MAX_LABELS."""
    split = [part for value in labels for part in value.split(",")]
    if len(split) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, counted after splitting on commas; "
                         f"got {len(split)}")
    if any(len(label) > MAX_LABEL_LENGTH for label in split):
        raise ValueError(f"a label may have at most {MAX_LABEL_LENGTH} characters")
    return labels


class ClassifyBody(_NoNulls):
    """Zero-shot scores of an indexed image: explicit labels (≥ 2) or a preset."""

    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra=_choice("labels", "preset"))
    _NOT_NULL = ("labels", "preset")

    id: ImageId
    labels: list[str] | None = Field(
        None, min_length=2, max_length=MAX_LABELS, examples=[["pleural effusion", "normal"]],
        description=f"at most {MAX_LABELS} labels; commas inside a label split it; labels "
                    "that are blank or repeat one another are answered 400",
        json_schema_extra={"items": {"type": "string", "maxLength": MAX_LABEL_LENGTH,
                                     "pattern": _LABEL}})
    preset: Literal["cxr", "derm", "fundus", "pathology"] | None = None
    templates: list[Template] | None = Field(None, max_length=MAX_TEMPLATES,
                                             description="prompt templates with {}")
    max_entropy: float = Field(0.8, ge=0.0, le=1.0)
    min_margin: float = Field(0.1, ge=0.0, le=1.0)

    _templates = field_validator("templates")(classmethod(lambda cls, v: _check_templates(v)))

    @field_validator("labels", mode="before")
    @classmethod
    def _label_count(cls, value):
        # Counted after splitting on commas, before anything else: one item holding 2,000
        # commas would otherwise be 2,000 labels.
        if isinstance(value, list) and all(isinstance(label, str) for label in value):
            _check_labels(value)
        return value

    @field_validator("labels")
    @classmethod
    def _no_commas(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any("," in label for label in value):
            raise ValueError("a label may not contain a comma; give each label as its own item")
        return value

    @model_validator(mode="after")
    def _labels_or_preset(self):
        if (self.labels is None) == (self.preset is None):
            raise ValueError("give either labels or a preset, exactly one of them")
        return self


Template = Annotated[str, Field(max_length=500, json_schema_extra={"pattern": r"\{\}"})]


def _check_templates(value: list[str] | None) -> list[str] | None:
    if value is not None and any("{}" not in t for t in value):
        raise ValueError("a template needs '{}' where the label goes, e.g. 'an x-ray showing {}'")
    return value


class ClassifyUploadFields(BaseModel):
    """Form fields that accompany an uploaded ``file`` for /classify."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_choice("labels", "preset"))

    labels: str | None = Field(None, min_length=1, max_length=MAX_LABELS * (MAX_LABEL_LENGTH + 1),
                               description=f"comma-separated, at most {MAX_LABELS}")
    preset: Literal["cxr", "derm", "fundus", "pathology"] | None = None
    templates: list[Template] | None = Field(None, max_length=MAX_TEMPLATES,
                                             description="prompt templates with {}")
    max_entropy: float = Field(0.8, ge=0.0, le=1.0)
    min_margin: float = Field(0.1, ge=0.0, le=1.0)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: str | None) -> str | None:
        return None if value is None else _check_labels([value])[0]

    _templates = field_validator("templates")(classmethod(lambda cls, v: _check_templates(v)))

    @model_validator(mode="after")
    def _labels_or_preset(self):
        if (self.labels is None) == (self.preset is None):
            raise ValueError("give either labels or a preset, exactly one of them")
        return self


class UploadFields(BaseModel, extra="forbid"):
    """Form fields that accompany an uploaded ``file``."""

    query: str | None = Field(None, max_length=2000)
    weight: float = Field(1.0, ge=-100, le=100)
    k: int = Field(10, ge=1, le=1000)
    filters: FiltersBody | None = None
    min_score: float | None = Field(None, ge=-1.0, le=1.0)


class ResultBody(BaseModel):
    id: int
    path: str
    frame: int
    score: float
    metadata: dict


class ResultsBody(BaseModel):
    results: list[ResultBody]


@dataclass
class QuerySpec:
    """A query as the engine runs it, whichever route and body it came from."""

    terms: list[Term] = field(default_factory=list)
    upload: tuple[bytes, str] | None = None     # (content, kind)
    k: int = 10
    filters: Filters | None = None
    min_score: float | None = None


def _text_terms(query: str | None) -> list[Term]:
    return parse_query(query, allow_files=False) if query and query.strip() else []


def _leading_op(query: str | None) -> str | None:
    """Extra terms after an image: ``- "tube"`` as is, a bare ``"effusion"`` as ``+ "effusion"``."""
    if not query or not query.strip():
        return None
    q = query.strip()
    return q if q[0] in "+-" else "+ " + q


def spec_from_search(body: SearchBody) -> QuerySpec:
    if body.query and body.terms:
        raise InputError("give either query or terms, not both")
    if body.terms:
        terms = []
        for t in body.terms:
            if (t.text is None) == (t.id is None):
                raise InputError("each term needs exactly one of text or id")
            terms.append(Term("text", t.text, t.weight) if t.text is not None
                         else Term("id", t.id, t.weight))
    else:
        terms = _text_terms(body.query)
    if not terms:
        raise InputError("the query is empty: give query (text) or terms")
    return QuerySpec(terms, None, body.k, body.filters.to_filters() if body.filters else None,
                     body.min_score)


def spec_from_similar(body: SimilarBody) -> QuerySpec:
    extra = _text_terms(_leading_op(body.query))
    return QuerySpec([Term("id", body.id, 1.0)] + extra, None, body.k,
                     body.filters.to_filters() if body.filters else None, body.min_score)


def spec_from_upload(content: bytes, kind: str, fields: UploadFields) -> QuerySpec:
    extra = _text_terms(_leading_op(fields.query))
    return QuerySpec([Term("upload", "file", fields.weight)] + extra, (content, kind), fields.k,
                     fields.filters.to_filters() if fields.filters else None, fields.min_score)


# -- the engine: store + towers + locks --------------------------------------------------------
class Engine:
    """Everything a request needs, shared by all requests of one process."""

    def __init__(self, store: Store, searcher: Searcher, decode_upload: DecodeUpload | None,
                 decode_stored: DecodeStored | None, preview_cache: int = 512) -> None:
        self.store, self.searcher = store, searcher
        self.decode_upload, self.decode_stored = decode_upload, decode_stored
        self.text_lock = threading.Lock()
        self.vision_lock = threading.Lock()
        self.store_lock = threading.RLock()
        self.decode_slots = threading.BoundedSemaphore(max(1, min(4, os.cpu_count() or 1)))
        self._version_db = sqlite3.connect(store.root / DATABASE, check_same_thread=False)
        # the version first, then the rows: anything committed while the models loaded (the
        # store was opened before them) is picked up now, not only after the next commit
        self._version = self._data_version()
        store.reconcile()
        self._previews: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._preview_lock = threading.Lock()
        self._preview_limit = preview_cache
        self.started = time.time()
        self._classifier = None

    @property
    def image_size(self) -> int:
        return self.searcher.vision_encoder.image_size

    def _data_version(self) -> int:
        return int(self._version_db.execute("PRAGMA data_version").fetchone()[0])

    def refresh(self) -> None:
        """Pick up rows another process committed since the last request."""
        with self.store_lock:
            version = self._data_version()
            if version == self._version:
                return
            try:
                self.store.reconcile()
            except StoreError as exc:  # a write landed mid-read: try again next request
                log.warning("store refresh deferred: %s", exc)
                return
            self._version = version
            with self._preview_lock:  # previews of removed (e.g. forgotten) images go too
                cached = {i for i, _ in self._previews}
            gone = cached - set(self.store.rows(sorted(cached))) if cached else set()
            with self._preview_lock:
                for key in [k for k in self._previews if k[0] in gone]:
                    del self._previews[key]
            log.info("store changed on disk; index now holds %d vectors", self.store.count)

    def _check_ids(self, ids: list[int]) -> None:
        too_large = [i for i in ids if not 0 <= i <= MAX_ID]
        if too_large:  # SQLite cannot even be asked (OverflowError): no such image
            raise NotFound(f"no indexed image with id {too_large[0]}")
        if ids:
            with self.store_lock:
                found = self.store.rows(ids)
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFound(f"no indexed image with id {missing[0]}")

    def _embed_upload(self, content: bytes, kind: str) -> np.ndarray:
        import torch

        if self.decode_upload is None:
            raise UnsupportedMedia("this server was started without an image decoder; "
                                   "search by text or by indexed id")
        try:
            with self.decode_slots:  # bounds the memory that concurrent large uploads take
                tensor = self.decode_upload(content, kind, self.image_size)
        except MedsearchError as exc:
            raise UndecodableImage(f"the uploaded {kind.upper()} could not be decoded: {exc}") from None
        with self.vision_lock:
            return self.searcher.vision_encoder.embed_batch(torch.from_numpy(tensor[None]))[0]

    def run(self, spec: QuerySpec) -> list[Result]:
        self.refresh()
        self._check_ids([int(t.value) for t in spec.terms if t.kind == "id"])
        upload_vector = self._embed_upload(*spec.upload) if spec.upload else None
        with self.text_lock:
            vector = self.searcher.terms_vector(spec.terms, lambda term: upload_vector)
        exclude = {int(t.value) for t in spec.terms if t.kind == "id" and t.weight > 0}
        with self.store_lock:
            return self.searcher.by_vector(vector, spec.k, spec.filters, spec.min_score,
                                           exclude or None)

    def classify(self, image_id: int | None, upload: tuple[bytes, str] | None,
                 labels: list[str] | None, preset: str | None, templates: list[str] | None,
                 max_entropy: float, min_margin: float) -> dict:
        """Zero-shot scores (retrieval.zeroshot) of a stored vector or an uploaded image."""
        from .zeroshot import (ReviewThresholds, ZeroShotClassifier, classifications,
                               read_logit_scalars, resolve_labels)

        chosen, prompts = resolve_labels(labels, preset, templates)
        if len(chosen) * len(prompts) > MAX_PROMPTS:
            raise InputError(f"too many prompts: {len(chosen)} labels × {len(prompts)} templates "
                             f"is over {MAX_PROMPTS}; use fewer labels or templates")
        self.refresh()
        if upload is not None:
            vector = self._embed_upload(*upload)
        else:
            self._check_ids([image_id])
            vector = self.store.vectors([image_id])[0]
        with self.text_lock:
            if self._classifier is None:
                text = self.searcher.text_encoder
                self._classifier = ZeroShotClassifier(text, read_logit_scalars(text.checkpoint))
            if len(self._classifier._label_cache) > 64:  # bound memory under arbitrary labels
                self._classifier._label_cache.clear()
            scores = self._classifier.scores(vector[None, :], chosen, prompts)
        return classifications(scores, ReviewThresholds(max_entropy, min_margin))[0].to_json()

    def row(self, image_id: int) -> dict:
        self._check_ids([image_id])
        self.refresh()
        with self.store_lock:
            rows = self.store.rows([image_id])
        if image_id not in rows:
            raise NotFound(f"no indexed image with id {image_id}")
        return rows[image_id]

    def stats(self) -> dict:
        self.refresh()
        with self.store_lock:
            m = self.store.manifest
            doc = {"model": m.model, "dim": m.dim, "count": self.store.count,
                   "index_type": m.index_type}
            for name in ("index_auto", "index_reason", "model_revision", "preprocessing_version"):
                if hasattr(m, name):
                    doc[name] = getattr(m, name)
            return {**doc, **self.store.index_status(), **self.store.stats()}

    def preview(self, image_id: int, size: int | None) -> bytes:
        """PNG of exactly what the model saw for this image, optionally scaled down."""
        from PIL import Image

        from .model.preprocess import model_input_to_uint8

        size = min(size or self.image_size, self.image_size)
        key = (image_id, size)
        row = self.row(image_id)  # first: a removed image is never served from the cache
        with self._preview_lock:
            if key in self._previews:
                self._previews.move_to_end(key)
                return self._previews[key]
        if self.decode_stored is None:
            raise NotFound("previews are not available: the server has no image decoder")
        try:
            tensor = self.decode_stored(row["path"], int(row["frame"]), self.image_size, self.store.manifest.decode)
        except MedsearchError as exc:
            reason = str(exc).replace(row["path"], self.searcher.redact(row["path"]))
            raise NotFound(f"the source of image {image_id} can no longer be read: {reason}") from None
        import torch

        image = Image.fromarray(model_input_to_uint8(torch.from_numpy(np.asarray(tensor))))
        if size < image.width:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="PNG")
        data = out.getvalue()
        with self._preview_lock:
            self._previews[key] = data
            while len(self._previews) > self._preview_limit:
                self._previews.popitem(last=False)
        return data


# -- the ASGI guard: auth, upload limit, metrics, last-resort errors ---------------------------
class _BodyTooLarge(Exception):
    pass


class Metrics:
    """Prometheus metrics of one app (its own registry: several apps may share a process)."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                                       disable_created_metrics)

        disable_created_metrics()  # the *_created series only double the scrape
        self.registry = CollectorRegistry()
        self.requests = Counter("medsearch_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("medsearch_request_seconds", "Request latency", ["route"],
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.rejected = Counter("medsearch_rejected_requests", "Requests refused before routing",
                                ["reason"], registry=self.registry)
        images = Gauge("medsearch_index_vectors", "Vectors in the in-memory index",
                       registry=self.registry)
        images.set_function(lambda: engine.store.count)
        uptime = Gauge("medsearch_uptime_seconds", "Seconds since the app was made",
                       registry=self.registry)
        uptime.set_function(lambda: time.time() - engine.started)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _method_label(method: str) -> str:
    """A client picks any method name: metrics keep the standard ones and fold the rest."""
    return method if method in _METHODS else "other"


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header (or an Origin's authority) → (lower-case name, port); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):  # [v6]:port
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":")
    if not name or (port and not port.isdigit()) or len(port) > 5:
        return None
    return name, (int(port) if port else None)


class HostPolicy:
    """Which ``Host`` names this server answers to (defence against DNS rebinding).

    A page on evil.example whose name an attacker re-points at 127.0.0.1 reaches a loopback
    server from the user's browser, but its requests still say ``Host: evil.example``: only
    the names listed here are served. An entry ``name`` admits any port, ``name:port`` that
    port only; ``*`` admits every host (the token is then the only guard).
    """

    def __init__(self, allowed: list[str] | None = None) -> None:
        entries = list(LOOPBACK_HOSTS) + list(allowed or [])  # loopback names are always ours
        self.any = "*" in entries
        self.names: set[str] = set()
        self.pairs: set[tuple[str, int]] = set()
        for entry in entries:
            if entry == "*":
                continue
            parsed = split_host(entry if ":" not in entry or entry.startswith("[")
                                or entry.count(":") == 1 else f"[{entry}]")
            if parsed is None:
                raise ValueError(f"not a host name or host:port: {entry!r}")
            name, port = parsed
            (self.names.add(name) if port is None else self.pairs.add((name, port)))

    def admits(self, host: str) -> bool:
        if self.any:
            return True
        parsed = split_host(host)
        if parsed is None:
            return False
        return self._known(*parsed, default_port=80)

    def admits_origin(self, origin: str) -> bool:
        """An Origin header (scheme://host[:port]) that names one of our hosts."""
        scheme, sep, authority = origin.strip().partition("://")
        if not sep or scheme.lower() not in ("http", "https") or "/" in authority:
            return False
        if self.any:
            return True
        parsed = split_host(authority)
        if parsed is None:
            return False
        return self._known(*parsed, default_port=443 if scheme.lower() == "https" else 80)

    def _known(self, name: str, port: int | None, default_port: int) -> bool:
        """An allowed name, with any port or with the port it was allowed with."""
        return name in self.names or (name, port or default_port) in self.pairs


class Guard:
    """Outermost app middleware; pure ASGI so it can refuse a body before it is read."""

    OPEN_PATHS = {"/health"}

    def __init__(self, app, *, token: str | None, max_body: int, metrics: Metrics,
                 hosts: HostPolicy | None = None) -> None:
        self.app, self.token, self.max_body, self.metrics = app, token, max_body, metrics
        self.hosts = hosts or HostPolicy()

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credential = value.partition(" ")
        credential = credential.strip()
        if scheme.lower() == "basic":  # browsers: any user name, the token as password
            try:
                credential = base64.b64decode(credential, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(credential.encode(), self.token.encode())

    async def _send_error(self, send, status: int, message: str, kind: str,
                          headers: dict | None = None) -> None:
        response = _error(status, message, kind, headers)
        await send({"type": "http.response.start", "status": status,
                    "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        state = {"status": 500, "started": False, "rejected": False}

        async def finish(route: str) -> None:
            self.metrics.requests.labels(route, _method_label(scope["method"]),
                                         str(state["status"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

        # Before anything else (auth included): a request for a host we are not is answered
        # with nothing but the refusal.
        host = headers.get(b"host")
        if host is None or not self.hosts.admits(host.decode("latin-1")):
            state["status"] = 400 if host is None else 421
            self.metrics.rejected.labels("host").inc()
            await self._send_error(
                send, state["status"],
                "the request has no Host header" if host is None else
                "this server does not answer to that Host name (a web page on another site "
                "may be trying to reach it); a reverse proxy's name is added with "
                "--allowed-host NAME", "MisdirectedRequest")
            await finish("rejected")
            return
        origin = headers.get(b"origin")
        if origin is not None and not self.hosts.admits_origin(origin.decode("latin-1")):
            state["status"] = 403
            self.metrics.rejected.labels("origin").inc()
            await self._send_error(send, 403, "cross-site requests are refused (the Origin "
                                   "header names another site)", "Forbidden")
            await finish("rejected")
            return

        if self.token and scope["path"] not in self.OPEN_PATHS and not self._authorised(headers):
            # The page and its files ask a browser for the token with its own login prompt.
            page = scope["path"] == "/" or scope["path"].startswith("/static/")
            browser = page or b"text/html" in headers.get(b"accept", b"")
            challenge = 'Basic realm="medsearch"' if browser else 'Bearer realm="medsearch"'
            state["status"] = 401
            self.metrics.rejected.labels("unauthorised").inc()
            await self._send_error(send, 401, "missing or wrong token: send "
                                   "'Authorization: Bearer <token>'", "Unauthorized",
                                   {"WWW-Authenticate": challenge})
            await finish("unauthorised")
            return
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                state["status"] = 400
                await self._send_error(send, 400, "invalid Content-Length", "BadRequest")
                await finish("invalid")
                return
            if int(length) > self.max_body:
                state["status"] = 413
                self.metrics.rejected.labels("too_large").inc()
                await self._send_error(send, 413, self._too_large(), "PayloadTooLarge")
                await finish("too_large")
                return
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    state["rejected"] = True
                    raise _BodyTooLarge()
            return message

        async def watched_send(message) -> None:
            if state["rejected"]:
                return  # the app's answer to a body we cut off is replaced by the 413
            if message["type"] == "http.response.start":
                state["started"] = True
                state["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _BodyTooLarge:
            pass
        except Exception as exc:
            # The exception's text may quote request data (SQL parameters, a path glob, a
            # query): log where it happened and its type, never its message.
            log.error("unhandled error on %s %s: %s (message withheld: it may quote request "
                      "data)\n%s", _method_label(scope["method"]), _route_of(scope),
                      type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
            if not state["started"] and not state["rejected"]:
                state["status"] = 500
                await self._send_error(send, 500, "internal error; the server log has details",
                                       "InternalError")
        if state["rejected"]:
            state["status"] = 413
            self.metrics.rejected.labels("too_large").inc()
            await self._send_error(send, 413, self._too_large(), "PayloadTooLarge")
        await finish(_route_of(scope))

    def _too_large(self) -> str:
        return f"request body over the upload limit of {self.max_body} bytes"


def _route_of(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


# -- the app -----------------------------------------------------------------------------------
def _depth(data, limit: int) -> int:
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


async def _json_body(request: Request) -> dict:
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
    if _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise InvalidBody(f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return data


def _validated(model: type[BaseModel], data: dict) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _upload_spec(request: Request) -> QuerySpec:
    """A multipart body: one ``file`` (PNG, JPEG or DICOM, by its bytes) and optional fields."""
    content, kind, fields = await _read_upload(request)
    return spec_from_upload(content, kind, _validated(UploadFields, fields))


async def _read_upload(request: Request) -> tuple[bytes, str, dict]:
    """The uploaded ``file`` (checked by its bytes), its kind, and the other form fields."""
    try:
        form = await request.form(max_files=1, max_fields=24)  # 8 templates + the rest
    except _BodyTooLarge:
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
            if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
                raise InvalidBody(f"the {key!r} field is nested too deeply")
        fields[key] = value
    if templates:
        fields["templates"] = _form_templates(templates)
    return content, kind, fields


def _form_templates(parts: list[str]) -> list[str]:
    """Templates as form fields: one part per template; one part holding a JSON list of
    strings is read as that list (how earlier clients sent them)."""
    if len(parts) == 1 and parts[0].lstrip().startswith("["):
        try:
            value = json.loads(parts[0])
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, list) and all(isinstance(t, str) for t in value):
            return value
    return parts


def _multipart(fields: type[BaseModel]) -> dict:
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


def _openapi_query_body(json_model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
        "multipart/form-data": _multipart(UploadFields)}}}


def _openapi_classify_body() -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyBody"}},
        "multipart/form-data": _multipart(ClassifyUploadFields)}}}


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


_ERRORS = {
    400: "A request the schema allows but whose content cannot be used: a query expression "
         "that does not parse or whose terms cancel out, labels that repeat, a bad date",
    401: "Missing or wrong token (only when the server has one)",
    403: "A cross-site request (its Origin names another site)",
    404: "No indexed image with that id, or its source can no longer be read",
    413: "The body is over the upload limit (JSON bodies: over 1 MiB)",
    415: "The upload is not a PNG, JPEG or DICOM file (judged by its bytes)",
    421: "The Host header names a host this server does not answer to",
    422: "The request does not match the schema, or the upload cannot be decoded",
    503: "The model or the store is not available",
}


def _responses(*codes: int) -> dict:
    """OpenAPI responses: every error this route can give, all with the ErrorBody shape."""
    return {code: {"model": ErrorBody, "description": _ERRORS[code]} for code in codes}


_ALWAYS = (401, 403, 413, 421)


def _json_request(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def create_app(store: str | Path, *, model: str | None = None, device: str = "auto",
               precision: str = "auto", token: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               decode_upload: DecodeUpload | None = None,
               decode_stored: DecodeStored | None = None,
               allowed_hosts: list[str] | None = None, redact_paths: str = "none",
               keys: KeyFiles | None = None, cuda_bf16: str = "weights",
               cache_dir: Path | None = None) -> FastAPI:
    """Open the store read-only, load both towers once, and build the app.

    ``token`` is stripped of surrounding white space and may not be blank; ``allowed_hosts``
    are the Host names served (default: the loopback names), see :class:`HostPolicy`.
    """
    if token is not None:
        token = token.strip()
        if not token:
            raise ValueError("the token is blank; give a real one or none")
    hosts = HostPolicy(allowed_hosts)
    st = Store.open(store, readonly=True)
    searcher = Searcher(st, model, device, precision, redact_paths, keys=keys,
                        cuda_bf16=cuda_bf16, cache_dir=cache_dir)
    _ = (searcher.text_encoder, searcher.vision_encoder)  # load now: errors show at start-up
    engine = Engine(st, searcher, decode_upload, decode_stored)
    metrics = Metrics(engine)

    # FastAPIOffline: /docs serves Swagger UI from the package, not a CDN (hospitals are offline)
    app = FastAPIOffline(title="medsearch", version="0.1.0",
                         description="Search medical images by text, image or indexed id. "
                                     "For research use only; not for diagnosis.")
    app.state.engine = engine
    app.add_middleware(Guard, token=token, max_body=max_upload_bytes, metrics=metrics, hosts=hosts)

    @app.exception_handler(MedsearchError)
    async def _medsearch_error(_request: Request, exc: MedsearchError):
        status = next(code for cls, code in _STATUS if isinstance(exc, cls))
        return _error(status, str(exc), getattr(exc, "kind", type(exc).__name__))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return _error(400, "the request body is not valid JSON", "InputError")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors())
        return _error(422, f"invalid request: {problems}", "ValidationError")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "HTTPError", getattr(exc, "headers", None))

    def results(found: list[Result]) -> dict:
        return {"results": [r.to_json() for r in found]}

    @app.get("/health", tags=["service"], responses=_responses(403, 421))
    def health() -> dict:
        """Liveness (no token needed, no data)."""
        return {"status": "ok"}

    @app.get("/stats", tags=["service"], responses=_responses(*_ALWAYS, 503))
    def stats() -> dict:
        """Model, dimension, counts and index type of the store (as `medsearch info`)."""
        return engine.stats()

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"}, **_responses(*_ALWAYS)})
    def prometheus() -> Response:
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/search", tags=["search"], response_model=ResultsBody,
              openapi_extra=_json_request(SearchBody),
              responses=_responses(*_ALWAYS, 400, 404, 422, 503))
    async def search(request: Request) -> dict:
        """Text search, with query arithmetic, filters and a score threshold."""
        spec = spec_from_search(_validated(SearchBody, await _json_body(request)))
        return results(await run_in_threadpool(engine.run, spec))

    @app.post("/similar", tags=["search"], response_model=ResultsBody,
              openapi_extra=_openapi_query_body(SimilarBody),
              responses=_responses(*_ALWAYS, 400, 404, 415, 422, 503))
    async def similar(request: Request) -> dict:
        """Similar cases for an uploaded image (multipart ``file``) or an indexed id (JSON)."""
        if _is_multipart(request):
            spec = await _upload_spec(request)
        else:
            spec = spec_from_similar(_validated(SimilarBody, await _json_body(request)))
        return results(await run_in_threadpool(engine.run, spec))

    @app.post("/export", tags=["search"], openapi_extra=_openapi_query_body(ExportBody),
              response_class=Response, responses={
                  200: {"description": "The cohort's rows, one per result",
                        "content": {"text/csv": {"schema": {"type": "string"}},
                                    "application/json": {"schema": {"type": "array"}},
                                    "application/vnd.apache.parquet": {
                                        "schema": {"type": "string", "format": "binary"}}}},
                  **_responses(*_ALWAYS, 400, 404, 415, 422, 503)})
    async def export(request: Request,
                     format: Literal["csv", "json", "parquet"] = Query("csv")) -> Response:
        """The cohort of a query (as /search, /similar) as CSV, JSON or Parquet rows."""
        if _is_multipart(request):
            spec = await _upload_spec(request)
        else:
            body = _validated(ExportBody, await _json_body(request))
            if body.id is not None:
                spec = spec_from_similar(SimilarBody(id=body.id, query=body.query, k=body.k,
                                                     filters=body.filters,
                                                     min_score=body.min_score))
            else:
                spec = spec_from_search(SearchBody.model_construct(
                    query=body.query, terms=body.terms, k=body.k, filters=body.filters,
                    min_score=body.min_score))
        found = await run_in_threadpool(engine.run, spec)
        rows = cohort.cohort_rows(r.to_json() for r in found)
        data = await run_in_threadpool(cohort.to_bytes, rows, format)
        return Response(data, media_type=cohort.MEDIA_TYPES[format], headers={
            "Content-Disposition": f'attachment; filename="medsearch-cohort.{format}"'})

    @app.post("/classify", tags=["search"], openapi_extra=_openapi_classify_body(),
              responses=_responses(*_ALWAYS, 400, 404, 415, 422, 503))
    async def classify(request: Request) -> dict:
        """Zero-shot scores of an indexed image (JSON ``id``) or an upload (multipart
        ``file``): softmax across the labels and a sigmoid per label. Research use only."""
        if _is_multipart(request):
            content, kind, fields = await _read_upload(request)
            body = _validated(ClassifyUploadFields, fields)
            labels = [body.labels] if body.labels else None
            args = (None, (content, kind), labels, body.preset, body.templates,
                    body.max_entropy, body.min_margin)
        else:
            body = _validated(ClassifyBody, await _json_body(request))
            args = (body.id, None, body.labels, body.preset, body.templates,
                    body.max_entropy, body.min_margin)
        return await run_in_threadpool(engine.classify, *args)

    @app.get("/images/{image_id}", tags=["images"],
             responses=_responses(*_ALWAYS, 404, 422, 503))
    def image(image_id: Annotated[PathId, FastPath()]) -> dict:
        """Stored metadata of one indexed image."""
        return engine.searcher.redact.row(engine.row(image_id))

    @app.get("/images/{image_id}/preview", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/png": {"schema": {"type": "string",
                                                                   "format": "binary"}}},
                              "description": "PNG"},
                        **_responses(*_ALWAYS, 404, 422, 503)})
    def preview(image_id: Annotated[PathId, FastPath()],
                size: PreviewSize | None = Query(None)) -> Response:
        """PNG of the model input (padded, resized) of one indexed image."""
        return Response(engine.preview(image_id, size), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                       "style-src 'self'; script-src 'self'; object-src 'none'; "
                                       "frame-ancestors 'none'",
            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _document_bodies(app, [SearchBody, SimilarBody, ExportBody, ClassifyBody, FiltersBody,
                           TermBody, ErrorBody], secured=bool(token))
    return app


def _document_bodies(app: FastAPI, models: list[type[BaseModel]], secured: bool) -> None:
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
