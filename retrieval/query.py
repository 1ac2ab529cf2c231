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
from typing import TYPE_CHECKING, Callable, Literal

from .errors import InputError

if TYPE_CHECKING:  # imported where vectors are combined: the command line parses at start-up
    import numpy as np

TermKind = Literal["text", "id", "file", "upload"]
#: The file names the indexer reads as images or DICOM; a query term ending so names a file.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
FILE_SUFFIXES = tuple(sorted(IMAGE_SUFFIXES | DICOM_SUFFIXES))
_WEIGHT = re.compile(r"^([0-9]*\.?[0-9]+):(?=\S)")
_ID = re.compile(r"^#([0-9]+)$")
#: A user's terms (16) plus relevance feedback's (up to 32 relevant and 32 not relevant ids).
MAX_TERMS = 80
MAX_FEEDBACK = 32
#: Rocchio weights: the query as given, the mean of the relevant images, minus that of the others.
ROCCHIO_ALPHA, ROCCHIO_BETA, ROCCHIO_GAMMA = 1.0, 0.75, 0.15


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
    import numpy as np

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


VectorOf = Callable[[Term], "np.ndarray"]


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


def rocchio(terms: list[Term], relevant: list[int], not_relevant: list[int], *,
            alpha: float = ROCCHIO_ALPHA, beta: float = ROCCHIO_BETA,
            gamma: float = ROCCHIO_GAMMA) -> list[Term]:
    """Relevance feedback as query arithmetic: q' = alpha·q + beta·mean(relevant) −
    gamma·mean(not relevant). The query's own terms keep their weights (× alpha); each marked
    image becomes a ``#id`` term weighted beta/|R| or −gamma/|N|, so the result can be shown,
    edited and run again as an ordinary expression (:func:`expression`)."""
    relevant, not_relevant = list(relevant or []), list(not_relevant or [])
    for name, ids in (("relevant", relevant), ("not_relevant", not_relevant)):
        if len(ids) > MAX_FEEDBACK:
            raise InputError(f"{name} may list at most {MAX_FEEDBACK} ids, got {len(ids)}",
                             setting=name)
        if len(set(ids)) != len(ids):
            raise InputError(f"{name} lists an id more than once", setting=name)
    both = sorted(set(relevant) & set(not_relevant))
    if both:
        raise InputError(f"image {both[0]} is marked both relevant and not relevant",
                         setting="relevant")
    out = [Term(t.kind, t.value, t.weight * alpha) for t in terms]
    out += [Term("id", int(i), beta / len(relevant)) for i in relevant]
    out += [Term("id", int(i), -gamma / len(not_relevant)) for i in not_relevant]
    return out


def _number(weight: float) -> str:
    """A weight in the shortest positional form that reads back as the same float."""
    import numpy as np

    return np.format_float_positional(float(weight), trim="-")


def expression(terms: list[Term]) -> str:
    """The terms in the query syntax, every weight written out, so that parsing the text
    gives the same terms back (upload terms, which name no file, show as ``<upload>``)."""
    out = []
    for i, t in enumerate(terms):
        if t.kind == "text":
            quote = "'" if '"' in str(t.value) else '"'
            value = f"{quote}{t.value}{quote}"
        else:
            value = {"id": f"#{t.value}", "file": f"@{t.value}", "upload": "<upload>"}[t.kind]
        op = "- " if t.weight < 0 else ("" if i == 0 else "+ ")
        out.append(f"{op}{_number(abs(t.weight))}:{value}")
    return " ".join(out)
