"""The command line asks a running `medsearch serve` for the same store when there is one
(medsearch.runtime), so a query costs a request instead of loading the model and the index.

Only what the server answers exactly as this process would is sent: text and id terms (a file
term is read here), no other checkpoint (--model), no region. Any failure — no server, another
model or settings, a refused connection, an HTTP error, an answer that is not a page — returns
None and the command works locally, so errors and exit codes are the local ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from ..runtime import find_server
from ..settings import Settings

LocalOpt = Annotated[bool, typer.Option(
    "--local", help="Work in this process even when a server for the store is running.")]
#: A query a server takes longer than this to answer is run locally instead.
REQUEST_TIMEOUT = 600.0
RESULT_FIELDS = {"results", "offset", "next_offset", "query_expression"}


def _ask(cfg: Settings, root: Path, path: str, body: dict | None = None) -> dict | None:
    """The JSON answer of the server for this store and these settings, or None (none
    running, another model or settings, or any failure)."""
    try:
        server = find_server(root, cfg)
        doc = server.request(path, body, timeout=REQUEST_TIMEOUT) if server is not None else None
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def info(cfg: Settings, root: Path, *, local: bool = False) -> dict | None:
    """The server's /stats (what `medsearch info` shows), or None: work here."""
    doc = None if local else _ask(cfg, root, "/stats")
    if doc is None or "serving" not in doc or "count" not in doc:
        return None
    doc.pop("serving")
    return doc


def page(cfg: Settings, root: Path, terms: list, *, local: bool = False,
         model: str | None = None, filters=None, min_score: float | None = None,
         fields: dict | None = None, region: object | None = None) -> dict | None:
    """The server's page of results (``Page.to_json()``) for this query, or None: do it here."""
    if local or model is not None or region is not None:
        return None
    if not terms or any(t.kind not in ("text", "id") for t in terms):
        return None
    body: dict = {"terms": [{"text": str(t.value), "weight": float(t.weight)} if t.kind == "text"
                            else {"id": int(t.value), "weight": float(t.weight)} for t in terms],
                  "k": int(cfg.k)}
    if filters is not None:
        chosen = {k: v for k, v in dataclasses.asdict(filters).items() if v not in (None, [])}
        if chosen:
            body["filters"] = chosen
    if min_score is not None:
        body["min_score"] = float(min_score)
    for name, value in (fields or {}).items():
        if value is not None and value != [] and not (name == "offset" and value == 0):
            body[name] = value
    doc = _ask(cfg, root, "/search", body)
    return doc if doc is not None and set(doc) == RESULT_FIELDS else None
