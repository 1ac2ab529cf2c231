"""Request bodies: what each route accepts (the models the OpenAPI schema publishes) and the
application's QuerySpec each of them stands for."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema,
                      field_validator, model_validator)

from retrieval.errors import InputError
from retrieval.filters import GLOB_PATTERN, MAX_GLOB_LENGTH, Filters
from retrieval.query import MAX_TERMS, Term, parse_query

from ..app import MAX_ID, QuerySpec
from .query_fields import FormQueryShape, QueryShape

#: Zero-shot labels per request, counted after splitting on commas (each label is a text
#: forward pass under the text lock).
MAX_LABELS = 200
MAX_LABEL_LENGTH = 200
MAX_TEMPLATES = 8

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


class SearchBody(_NoNulls, QueryShape):
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


class SimilarBody(QueryShape):
    """Similar cases for an indexed image, optionally shifted by a query expression."""

    model_config = _JSON

    id: ImageId
    query: str | None = Field(None, max_length=2000, description="extra terms, e.g. '- \"tube\"'")
    k: TopK = 10
    filters: FiltersBody | None = None
    min_score: float | None = Field(None, ge=-1.0, le=1.0)


class ExportBody(_NoNulls, QueryShape):
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


class UploadFields(FormQueryShape, extra="forbid"):
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
    prob: float | None = None
    group_count: int | None = None


class ResultsBody(BaseModel):
    results: list[ResultBody]
    offset: int = 0
    next_offset: int | None = None
    query_expression: str = ""


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
                     body.min_score, **body.shape())


def spec_from_similar(body: SimilarBody) -> QuerySpec:
    extra = _text_terms(_leading_op(body.query))
    return QuerySpec([Term("id", body.id, 1.0)] + extra, None, body.k,
                     body.filters.to_filters() if body.filters else None, body.min_score,
                     **body.shape())


def spec_from_upload(content: bytes, kind: str, fields: UploadFields) -> QuerySpec:
    extra = _text_terms(_leading_op(fields.query))
    return QuerySpec([Term("upload", "file", fields.weight)] + extra, (content, kind), fields.k,
                     fields.filters.to_filters() if fields.filters else None, fields.min_score,
                     **fields.shape())

