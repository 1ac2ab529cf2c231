"""Query arithmetic: several weighted text and image terms combined into one query vector.

Syntax (as in rclip): terms joined by ``+`` and ``-`` standing alone between spaces, each with
an optional ``N:`` weight::

    "pleural effusion" - "chest tube"
    2:"effusion" + scan.png - 0.5:#17

A term is quoted or bare text, ``#N`` (the stored vector of indexed image N), or — where the
caller allows files — a path ending in an image/DICOM suffix or written ``@path``. Each term
is a unit vector; the query is ``Σ weight·vector`` renormalised to unit length. A query with
one plain text term gives exactly that text's vector, so ordinary searches are unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from .errors import InputError

TermKind = Literal["text", "id", "file", "upload"]
#: The file names the indexer reads as images or DICOM; a query term ending so names a file.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
FILE_SUFFIXES = tuple(sorted(IMAGE_SUFFIXES | DICOM_SUFFIXES))
_WEIGHT = re.compile(r"^([0-9]*\.?[0-9]+):(?=\S)")
_ID = re.compile(r"^#([0-9]+)$")
MAX_TERMS = 16


@dataclass(frozen=True)
class Term:
    """One weighted part of a query; ``value`` is the text, image id, file path or upload name."""

    kind: TermKind
    value: str | int
    weight: float = 1.0

    def to_json(self) -> dict:
        return {"kind": self.kind, "value": self.value, "weight": self.weight}


def _split(expression: str) -> list[tuple[int, str]]:
    """Top-level ``(sign, raw term)`` pairs; an operator needs space (or a quote) around it,
    so hyphenated words ("x-ray", "T2-weighted") stay text."""
    parts: list[tuple[int, str]] = []
    sign, current, quote, operator_seen = 1, [], None, False
    n = len(expression)
    for i, ch in enumerate(expression):
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
            continue
        so_far = "".join(current).strip()
        if ch in "\"'" and (not so_far or so_far.endswith(":")):
            quote = ch
            current.append(ch)
        elif (ch in "+-" and (i == 0 or expression[i - 1].isspace())
              and (i + 1 == n or expression[i + 1].isspace() or expression[i + 1] in "\"'")):
            if so_far:
                parts.append((sign, so_far))
            elif operator_seen or parts:
                raise InputError(f"query has two operators in a row near {expression[i:i + 20]!r}")
            sign, current, operator_seen = (1 if ch == "+" else -1), [], True
        else:
            current.append(ch)
    if quote:
        raise InputError(f"query has an unclosed {quote} quote: {expression!r}")
    so_far = "".join(current).strip()
    if not so_far:
        raise InputError("query ends with an operator and no term after it" if operator_seen
                         else "the query is empty")
    parts.append((sign, so_far))
    return parts


def _term(sign: int, raw: str, allow_files: bool) -> Term:
    weight = 1.0
    match = _WEIGHT.match(raw)
    if match:
        weight = float(match.group(1))
        raw = raw[match.end():].strip()
    weight *= sign
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        text = raw[1:-1].strip()
        if not text:
            raise InputError("a quoted query term is empty")
        return Term("text", text, weight)
    id_match = _ID.match(raw)
    if id_match:
        return Term("id", int(id_match.group(1)), weight)
    if raw.startswith("@") or raw.lower().endswith(FILE_SUFFIXES):
        path = raw[1:] if raw.startswith("@") else raw
        if not allow_files:
            raise InputError(f"query term {raw!r} names a file; files are not read here: upload "
                             "the image instead, or refer to an indexed image as #ID")
        return Term("file", path, weight)
    return Term("text", raw, weight)


def parse_query(expression: str, allow_files: bool = True) -> list[Term]:
    """Terms of a query expression; plain text is one text term of weight 1."""
    if expression is None or not expression.strip():
        raise InputError("the query is empty")
    terms = [_term(sign, raw, allow_files) for sign, raw in _split(expression.strip())]
    if len(terms) > MAX_TERMS:
        raise InputError(f"a query may have at most {MAX_TERMS} terms, this one has {len(terms)}")
    if all(t.weight == 0 for t in terms):
        raise InputError("every query term has weight 0")
    return terms


def combine(weighted: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """Σ weight·unit vector, renormalised; terms that cancel out are refused."""
    if not weighted:
        raise InputError("the query has no terms")
    total = np.zeros_like(np.asarray(weighted[0][1], dtype=np.float32))
    for weight, vector in weighted:
        vector = np.asarray(vector, dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        if norm > 0:
            total += np.float32(weight) * vector / norm
    length = float(np.linalg.norm(total))
    if length < 1e-6:
        raise InputError("the query's terms cancel each other out (the combined vector is zero); "
                         "change a weight or remove a negative term")
    return (total / length).astype(np.float32)


VectorOf = Callable[[Term], np.ndarray]


def query_vector(terms: list[Term], vector_of: VectorOf) -> np.ndarray:
    """Resolve each term with ``vector_of`` and combine them."""
    return combine([(term.weight, vector_of(term)) for term in terms])


def describe(terms: list[Term]) -> str:
    """A canonical one-line form of the terms (for reports, never for logs)."""
    out = []
    for i, t in enumerate(terms):
        magnitude = abs(t.weight)
        weight = "" if magnitude == 1 else f"{magnitude:g}:"
        value = {"text": f'"{t.value}"', "id": f"#{t.value}", "file": f"@{t.value}",
                 "upload": f"<upload {t.value}>"}[t.kind]
        op = "- " if t.weight < 0 else ("" if i == 0 else "+ ")
        out.append(f"{op}{weight}{value}")
    return " ".join(out)
