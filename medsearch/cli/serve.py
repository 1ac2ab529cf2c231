"""The service commands: `serve` (HTTP API + web page) and `export` (a cohort to a file)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from retrieval.errors import InputError
from retrieval.query import Term, parse_query

from .. import runtime
from . import remote
from .main import app
from .options import (DbOpt, BodyPartOpt, DateFromOpt, DateToOpt, DeviceOpt, JsonOpt, KOpt, LabelOpt,
                      MinScoreOpt, ModalityOpt, ModelOpt, PathGlobOpt, StoreOpt, build_filters,
                      resolve, store_root)
from .output import RESEARCH_NOTICE, emit, note
from .remote import LocalOpt
from .query_options import DedupeOpt, DistinctOpt, MinProbOpt, OffsetOpt, spec_fields


@app.command("serve")
def serve_cmd(
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, device: DeviceOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; other than loopback needs a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar="MEDSEARCH_TOKEN", show_envvar=True,
        help="Bearer token required on every route but /health.")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", envvar="MEDSEARCH_ALLOWED_HOSTS", show_envvar=True,
        help="Another Host name to answer to (e.g. a reverse proxy's), NAME or NAME:PORT; "
             "repeatable. Others get 421 (DNS rebinding).")] = None,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body, MB.")] = 64,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    json_out: JsonOpt = False,
) -> None:
    """Serve the HTTP API and the web page for a store (the model loads once)."""
    import uvicorn

    from ..app import Medsearch
    from ..web import create_app
    from ..web.guard import PathOnlyAccessLog, check_exposure, default_allowed_hosts, read_token

    check_exposure(host, token, allowed_host)
    token = read_token(token)
    if log_level not in ("debug", "info", "warning", "error"):
        raise InputError(f"--log-level must be debug, info, warning or error, not {log_level!r}")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    cfg = resolve(store=store, db=db, device=device)
    root = store_root(cfg)
    max_bytes = int(max_upload_mb * 1024 * 1024)
    hosts = default_allowed_hosts(host, port) + list(allowed_host or [])
    medsearch = Medsearch.from_settings(cfg, model=model)
    web = create_app(medsearch, token=token, max_upload_bytes=max_bytes, allowed_hosts=hosts)
    # the full checksum at start-up: a damaged index file is never answered from
    medsearch.store.verify_index_file()
    from indexer.isolation import prestart

    prestart()  # the isolated upload decoder's fork server is up before the first upload
    shown = f"[{host}]" if ":" in host else host
    doc = {"url": f"http://{shown}:{port}/", "store": str(root), "auth": bool(token),
           "max_upload_bytes": max_bytes, "allowed_hosts": hosts,
           "count": medsearch.store.count}
    note(f"medsearch: serving {doc['count']} vectors from {root} on {doc['url']} "
         f"(token {'required' if token else 'not set: loopback only'}). {RESEARCH_NOTICE}")
    if json_out:
        emit(doc, True)
    logging.getLogger("uvicorn.access").addFilter(PathOnlyAccessLog())
    identity = _publish(medsearch, host, port, token)

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, which ends the process
        at once: the runtime file goes while the signal is still held."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    runtime.withdraw(identity)

    try:
        Server(uvicorn.Config(web, host=host.strip("[]"), port=port, log_level=log_level,
                              server_header=False, proxy_headers=False)).run()
    finally:
        runtime.withdraw(identity)


def _publish(medsearch, host: str, port: int, token: str | None) -> str:
    """Say where this server listens for its store (medsearch.runtime), so `search`,
    `similar`, `export` and `classify` ask it; a wildcard bind is reached on loopback."""
    import ipaddress

    bound = host.strip("[]")
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(bound).is_unspecified:
            bound = "127.0.0.1" if "." in bound else "::1"
    shown = f"[{bound}]" if ":" in bound else bound
    doc = runtime.serving(medsearch.store, medsearch.settings)
    runtime.publish(doc["store"], f"http://{shown}:{port}", token, doc["answer_key"])
    return doc["store"]


# -- export ------------------------------------------------------------------------------------
def _export_human(d: dict) -> str:
    lines = [f"wrote {d['rows']} row(s) to {d['out']} ({d['format']})"]
    if d.get("files"):
        f = d["files"]
        lines.append(f"{f['mode']}: {f['placed']} file(s) into {f['folder']}, "
                     f"{len(f['skipped'])} skipped")
        lines += [f"  skipped id={s['id']}: {s['reason']}" for s in f["skipped"]]
    return "\n".join(lines)


@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="FILE.csv, FILE.json or FILE.parquet.")],
    query: Annotated[Optional[str], typer.Option(
        "--query", "-q", help="Text, or arithmetic: '\"pleural effusion\" - \"chest tube\"', "
                              "'2:\"effusion\" + scan.png', '#17 - \"tube\"'.")] = None,
    similar: Annotated[Optional[Path], typer.Option("--similar", help="Query image file.")] = None,
    image_id: Annotated[Optional[int], typer.Option("--id", help="An indexed image's id.")] = None,
    copy_to: Annotated[Optional[Path], typer.Option("--copy-to", help="Copy the source files here.")] = None,
    link_to: Annotated[Optional[Path], typer.Option("--link-to", help="Symlink the source files here.")] = None,
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, device: DeviceOpt = None, k: KOpt = None,
    min_score: MinScoreOpt = None, modality: ModalityOpt = None, body_part: BodyPartOpt = None,
    date_from: DateFromOpt = None, date_to: DateToOpt = None, path_glob: PathGlobOpt = None,
    label: LabelOpt = None, distinct: DistinctOpt = None, min_prob: MinProbOpt = None,
    offset: OffsetOpt = 0, dedupe: DedupeOpt = None, json_out: JsonOpt = False,
    local: LocalOpt = False,
) -> None:
    """Write a cohort (one row per result: score and stored metadata) to CSV, JSON or Parquet;
    a running `medsearch serve` for the store runs the query when there is one (see --local)."""
    from retrieval import export as cohort

    if sum(x is not None for x in (query, similar, image_id)) != 1:
        raise InputError("give exactly one of --query TEXT, --similar FILE or --id N")
    if copy_to is not None and link_to is not None:
        raise InputError("give --copy-to or --link-to, not both")
    fmt = cohort.format_for(out)
    if query is not None:
        terms = parse_query(query, allow_files=True)
    elif similar is not None:
        terms = [Term("file", str(similar), 1.0)]
    else:
        terms = [Term("id", image_id, 1.0)]
    cfg = resolve(store=store, db=db, device=device, k=k)
    fields = spec_fields(distinct, min_prob, offset, dedupe)
    placing = copy_to is not None or link_to is not None  # checked against redaction locally
    try:  # a bad filter is refused by the local path, after the store opened (its order)
        asked = build_filters(modality, body_part, date_from, date_to, path_glob, label)
    except InputError:
        placing = True
    doc = None if placing else remote.page(cfg, store_root(cfg), terms, local=local, model=model,
                                           min_score=min_score, filters=asked, fields=fields)
    if doc is not None:
        results = doc["results"]
    else:
        from ..app import Medsearch, QuerySpec

        with Medsearch.from_settings(cfg, model=model) as found:
            redact = found.searcher.redact
            if placing and redact.active:
                raise InputError("--copy-to and --link-to need the source paths, which "
                                 f"redact_paths ({redact.mode}) hides; export without them, "
                                 "or unset redact_paths / MEDSEARCH_REDACT_PATHS for this export")
            filters = build_filters(modality, body_part, date_from, date_to, path_glob, label)
            spec = QuerySpec(terms, k=cfg.k, filters=filters, min_score=min_score, **fields)
            results = [r.to_json() for r in found.query(spec, local_files=True)]
    rows = cohort.cohort_rows(results)
    written = cohort.write_rows(rows, out)
    doc = {"out": str(written.absolute()), "format": fmt, "rows": len(rows), "files": None}
    folder, mode = (copy_to, "copy") if copy_to is not None else (link_to, "link")
    if folder is not None:
        report = cohort.place_files(rows, folder, mode)
        doc["files"] = {"mode": mode, "folder": str(Path(folder).absolute()), **report.to_json()}
    emit(doc, json_out, _export_human)
