"""The command line asks a running `medsearch serve` for the same store when there is one
(medsearch.runtime), so a query costs a request instead of loading the model and the index.

Only what the server answers exactly as this process would is sent: text and id terms (a file
term is read here), no other checkpoint (--model), no region; `classify` sends a file's bytes
only where the server decodes and scores them as this process would (:func:`classify`). Any
failure — no server, another model or settings, a refused connection, an HTTP error, an answer
that is not a page — returns None and the command works locally, so errors and exit codes are
the local ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from ..runtime import MANIFEST, Server, find_server
from ..settings import Settings

LocalOpt = Annotated[bool, typer.Option(
    "--local", help="Work in this process even when a server for the store is running.")]
#: A query a server takes longer than this to answer is run locally instead.
REQUEST_TIMEOUT = 600.0
RESULT_FIELDS = {"results", "offset", "next_offset", "query_expression"}
CLASSIFY_FIELDS = {"results", "needs_review", "entropy", "margin", "review_reasons", "notice"}


def _ask(cfg: Settings, root: Path, path: str, body: dict | None = None,
         upload: tuple[bytes, list[tuple[str, str]]] | None = None,
         server: Server | None = None) -> dict | None:
    """The JSON answer of ``server`` (None: the one found for this store and these settings)
    to a JSON ``body``, or to an ``upload`` (the file's bytes and the form fields), or None
    (none running, another model or settings, or any failure)."""
    try:
        server = server or find_server(root, cfg)
        if server is None:
            return None
        if upload is not None:
            doc = server.upload(path, *upload, timeout=REQUEST_TIMEOUT)
        else:
            doc = server.request(path, body, timeout=REQUEST_TIMEOUT)
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


def classify(cfg: Settings, root: Path, file: Path, labels: list[str], templates: list[str],
             max_entropy: float, min_margin: float, *, local: bool = False) -> dict | None:
    """The server's zero-shot scores of ``file`` (``labels`` and ``templates`` as
    retrieval.zeroshot.resolve_labels gave them), or None: classify here.

    Local `classify` decodes the file with the default decode settings, through the torch text
    tower of the configured model; the server decodes an upload with its store's recorded
    settings, through the store's checkpoint and the configured text runtime. The server is
    asked only where these cannot differ: the store's query decoding is the default one, the
    configured model has the store's fingerprint, the text tower is torch's, and the file is a
    kind the server accepts that its bytes and its name make the same kind of source."""
    if local:
        return None
    try:  # a server first: without one, nothing else need be checked (the checkpoint hashed)
        server = find_server(root, cfg)
    except (OSError, ValueError):
        return None
    if server is None or not _same_classifier(cfg, root):
        return None
    try:
        content = Path(file).expanduser().read_bytes()
    except OSError:
        return None
    if not _same_source_kind(Path(file), content):
        return None
    fields = [("labels", ",".join(labels)), *(("templates", t) for t in templates),
              ("max_entropy", repr(float(max_entropy))), ("min_margin", repr(float(min_margin)))]
    doc = _ask(cfg, root, "/classify", upload=(content, fields), server=server)
    return doc if doc is not None and set(doc) == CLASSIFY_FIELDS else None


def _same_classifier(cfg: Settings, root: Path) -> bool:
    """Whether the store's server would decode, embed and score as local `classify` does."""
    from indexer.decode_settings import DecodeSettings
    from retrieval.errors import MedsearchError
    from retrieval.model.checkpoint import resolve_checkpoint
    from retrieval.model.names import effective_text_runtime

    if effective_text_runtime(cfg.text_runtime, cfg.device) != "torch":
        return False  # the server's searcher would use the ONNX text tower
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict):
        return False
    query, default = (DecodeSettings.from_manifest(manifest.get("decode")).for_query(),
                      DecodeSettings().for_query())
    if (query.window, query.frames) != (default.window, default.frames):
        return False
    try:  # what local classify loads (a hub id is found as it would find it)
        fingerprint = resolve_checkpoint(cfg.model).fingerprint
    except MedsearchError:
        return False
    return fingerprint == manifest.get("model_fingerprint")


def _same_source_kind(file: Path, content: bytes) -> bool:
    """Whether the server accepts these bytes, and decodes them as the same kind of source
    (image or DICOM) as the local decoder, which goes by the file's name, would."""
    from indexer.sources import classify as kind_of_path
    from indexer.sources import content_kind

    from ..decoders import sniff

    return sniff(content) is not None and \
        (kind_of_path(file.expanduser()) or "image") == content_kind(content)
