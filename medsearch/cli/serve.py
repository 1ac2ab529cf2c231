"""The service commands: `serve` (HTTP API + web page) and `export` (a cohort to a file)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from retrieval.errors import InputError
from retrieval.query import Term, parse_query

from .main import app
from .options import (BodyPartOpt, DateFromOpt, DateToOpt, DeviceOpt, JsonOpt, KOpt, LabelOpt,
                       MinScoreOpt, ModalityOpt, ModelOpt, PathGlobOpt, StoreOpt, build_filters,
                       key_files, resolve, searcher, store_root)
from .output import RESEARCH_NOTICE, emit, note

MIN_TOKEN_LENGTH = 16


# -- decoding, injected into the server (retrieval never imports indexer) -----------------------
def decode_upload(content: bytes, kind: str, size: int) -> np.ndarray:
    """An uploaded file's bytes → model input, decoded from memory exactly as the indexer
    decodes files, but in a child process with memory and time limits (indexer.isolation):
    a crafted upload costs a 422, never the server. ``kind`` was sniffed from the same bytes."""
    from indexer.view import UPLOAD_NAME, read_image

    try:
        return read_image(content, image_size=size, isolated=True).tensor
    except InputError as exc:  # the server says "the uploaded … could not be decoded: …"
        raise InputError(str(exc).removeprefix(f"{UPLOAD_NAME}: ")) from None


def decode_stored(path: str, frame: int, size: int, decode: dict | None = None) -> np.ndarray:
    """An indexed source's frame → model input (for previews), decoded with the settings the
    store recorded (``decode``: its manifest's); the path comes from the store."""
    from indexer.view import read_stored

    if not Path(path).is_file():
        raise InputError("the source file is no longer there")
    try:
        return read_stored(path, frame, image_size=size, decode=decode).tensor
    except InputError as exc:
        raise InputError(f"cannot decode it again: {str(exc).removeprefix(f'{path}: ')}") from None


# -- serve -------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(value: str | None) -> str | None:
    """The token as given (--token or MEDSEARCH_TOKEN) without surrounding white space; None
    when not given. A blank one is kept as "" so that check_exposure can refuse it."""
    return None if value is None else value.strip()


def check_exposure(host: str, token: str | None, allowed_hosts: list[str] | None = None) -> None:
    """Refuse to expose an archive without a token, or with a guessable one."""
    if token is not None and not token.strip():
        raise InputError("the token is blank (empty or only spaces); set a real one, e.g. "
                         "python -c 'import secrets; print(secrets.token_urlsafe(32))', or unset "
                         "MEDSEARCH_TOKEN / drop --token for a loopback-only server")
    token = read_token(token)
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise InputError(f"the token is too short ({len(token)} characters); use at least "
                         f"{MIN_TOKEN_LENGTH}, e.g. python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))'")
    if not is_loopback(host) and not token:
        raise InputError(
            f"refusing to listen on {host} without a token: anyone who can reach that address "
            "could search the archive. Set --token or MEDSEARCH_TOKEN (at least "
            f"{MIN_TOKEN_LENGTH} characters), or keep the default --host 127.0.0.1.")
    if "*" in (allowed_hosts or []) and not token:
        raise InputError("--allowed-host '*' answers every Host name, which lets any web page "
                         "reach the archive through a browser (DNS rebinding); it needs a token")


def default_allowed_hosts(host: str, port: int) -> list[str]:
    """The Host names a server bound to ``host:port`` answers to unless told more: the loopback
    names and the bound address (with the port); for a wildcard bind also this machine's names
    and addresses, as clients on the network know it."""
    names = ["localhost", "127.0.0.1", "::1"]
    bound = host.strip("[]")
    try:
        wildcard = ipaddress.ip_address(bound).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard and bound.lower() not in names:
        names.append(f"[{bound}]:{port}" if ":" in bound else f"{bound}:{port}")
    if wildcard:
        machine = {socket.gethostname(), socket.getfqdn()}
        try:
            machine |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        except OSError:
            pass
        names += sorted(name.lower() for name in machine if name)
    return names


class _PathOnly(logging.Filter):
    """Access log lines keep the path and drop the query string (it may carry request data)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = args[:2] + (args[2].split("?", 1)[0],) + args[3:]
        return True


@app.command("serve")
def serve_cmd(
    store: StoreOpt = None, model: ModelOpt = None, device: DeviceOpt = None,
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

    from retrieval.model.acceleration import configure_cpu_threads
    from retrieval.server import create_app

    check_exposure(host, token, allowed_host)
    token = read_token(token)
    if log_level not in ("debug", "info", "warning", "error"):
        raise InputError(f"--log-level must be debug, info, warning or error, not {log_level!r}")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    cfg = resolve(store=store, device=device)
    root = store_root(cfg)
    max_bytes = int(max_upload_mb * 1024 * 1024)
    hosts = default_allowed_hosts(host, port) + list(allowed_host or [])
    configure_cpu_threads(cfg.threads)
    web = create_app(root, model=model, device=cfg.device, precision=cfg.precision,
                     token=token,
                     max_upload_bytes=max_bytes, decode_upload=decode_upload,
                     decode_stored=decode_stored, allowed_hosts=hosts,
                     redact_paths=cfg.redact_paths, keys=key_files(cfg),
                     cuda_bf16=cfg.cuda_bf16, cache_dir=cfg.cache_folder)
    # the full checksum at start-up: a damaged index file is never answered from
    web.state.engine.store.verify_index_file()
    from indexer.isolation import prestart

    prestart()  # the isolated upload decoder's fork server is up before the first upload
    shown = f"[{host}]" if ":" in host else host
    doc = {"url": f"http://{shown}:{port}/", "store": str(root), "auth": bool(token),
           "max_upload_bytes": max_bytes, "allowed_hosts": hosts,
           "count": web.state.engine.store.count}
    note(f"medsearch: serving {doc['count']} vectors from {root} on {doc['url']} "
         f"(token {'required' if token else 'not set: loopback only'}). {RESEARCH_NOTICE}")
    if json_out:
        emit(doc, True)
    logging.getLogger("uvicorn.access").addFilter(_PathOnly())
    uvicorn.run(web, host=host.strip("[]"), port=port, log_level=log_level,
                server_header=False, proxy_headers=False)


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
    store: StoreOpt = None, model: ModelOpt = None, device: DeviceOpt = None, k: KOpt = None,
    min_score: MinScoreOpt = None, modality: ModalityOpt = None, body_part: BodyPartOpt = None,
    date_from: DateFromOpt = None, date_to: DateToOpt = None, path_glob: PathGlobOpt = None,
    label: LabelOpt = None, json_out: JsonOpt = False,
) -> None:
    """Write a cohort (one row per result: score and stored metadata) to CSV, JSON or Parquet."""
    from retrieval import export as cohort
    from retrieval.store import Store

    from indexer.pipeline import query_image_vector

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
    cfg = resolve(store=store, device=device, k=k)
    found = searcher(cfg, Store.open(store_root(cfg), readonly=True), model)
    if (copy_to is not None or link_to is not None) and found.redact.active:
        raise InputError("--copy-to and --link-to need the source paths, which redact_paths "
                         f"({found.redact.mode}) hides; export without them, or unset "
                         "redact_paths / MEDSEARCH_REDACT_PATHS for this export")
    filters = build_filters(modality, body_part, date_from, date_to, path_glob, label)
    results = found.query(
        terms, cfg.k, filters, min_score,
        image_vector=lambda term: query_image_vector(found.vision_encoder, Path(term.value),
                                                     found.store.manifest.decode))
    rows = cohort.cohort_rows(r.to_json() for r in results)
    written = cohort.write_rows(rows, out)
    doc = {"out": str(written.absolute()), "format": fmt, "rows": len(rows), "files": None}
    folder, mode = (copy_to, "copy") if copy_to is not None else (link_to, "link")
    if folder is not None:
        report = cohort.place_files(rows, folder, mode)
        doc["files"] = {"mode": mode, "folder": str(Path(folder).absolute()), **report.to_json()}
    emit(doc, json_out, _export_human)
