"""`medsearch receive`: be a DICOM node that modalities and PACS push to (C-STORE SCP); what
arrives is indexed into the store in short batches, with the same rules as `index`."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from retrieval.errors import InputError

from .main import app
from .options import (DbOpt, DeviceOpt, JsonOpt, ModelOpt, PrecisionOpt, StoreOpt, TlsCertOpt,
                      TlsKeyOpt, key_files, resolve, store_root, vision_encoder)
from .output import emit, note


def _allow_list(allow: str | None) -> tuple[str, ...]:
    titles = tuple(t.strip() for t in (allow or "").split(",") if t.strip())
    if not titles:
        raise InputError("say which calling AE titles may send (--allow CT1,PACS; '*' for "
                         "any, which the README advises against)", setting="allow")
    from indexer.pacs import valid_aet

    bad = [t for t in titles if t != "*" and not valid_aet(t)]
    if bad:
        raise InputError(f"AE titles are 1-16 ASCII characters: {', '.join(bad)} (--allow)")
    return titles


def _human(d: dict) -> str:
    return (f"received {d['received']} instance(s), refused {d['refused']}; indexed "
            f"{d['indexed']} ({d['images']} image(s)), unchanged {d['unchanged']}, "
            f"failed {d['failed']}, skipped {d['skipped']}; {d['spooled']} left in the spool")


@app.command("receive")
def receive_cmd(
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    aet: Annotated[str, typer.Option(help="Our AE title (senders call it).")] = "MEDSEARCH",
    host: Annotated[str, typer.Option(
        help="Address to listen on; 0.0.0.0 for every interface (default: this machine only).")]
        = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="DICOM port (0: any free one).")]
        = 11112,
    allow: Annotated[Optional[str], typer.Option(
        help="Calling AE titles accepted, comma-separated (required; '*': any).")] = None,
    batch_seconds: Annotated[float, typer.Option(
        min=0.1, help="The longest a received instance waits for its batch.")] = 2.0,
    quiet_period: Annotated[float, typer.Option(
        min=0, help="--series-vectors: seconds without a new instance before a series is "
                    "complete and its vector is computed.")] = 60.0,
    series_vectors: Annotated[bool, typer.Option(
        "--series-vectors", help="Also store one vector per DICOM series.")] = False,
    min_free_mb: Annotated[int, typer.Option(
        min=0, help="Refuse instances (Out of Resources: the sender retries) while the disk "
                    "has less free space than this.")] = 256,
    tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
    tls_ca: Annotated[Optional[Path], typer.Option(
        "--tls-ca", help="With --tls-cert: senders must present a certificate this CA signed.")]
        = None,
    json_out: JsonOpt = False,
) -> None:
    """Receive DICOM instances (C-STORE) and index them; stop with Ctrl-C or SIGTERM."""
    from indexer.pipeline import decode_pool
    from indexer.receive import ReceiveConfig, Receiver, server_tls
    from retrieval.model import resolve_checkpoint

    from .core import _store_model, store_for_run

    allowed = _allow_list(allow)
    cfg = resolve(store=store, db=db, device=device, precision=precision)
    root = store_root(cfg)
    if bool(tls_cert) != bool(tls_key):
        raise InputError("TLS needs both --tls-cert and --tls-key")
    tls = server_tls(tls_cert, tls_key, tls_ca) if tls_cert else None
    checkpoint = resolve_checkpoint(model or _store_model(root) or cfg.model)
    encoder = vision_encoder(cfg, checkpoint)
    stop = threading.Event()
    with store_for_run(root, encoder, cfg, window=None, frames=None,
                       series_vectors=series_vectors) as (st, decode), decode_pool(1) as pool:
        config = ReceiveConfig(aet=aet, host=host, port=port, allow=allowed,
                               batch_seconds=batch_seconds, quiet_seconds=quiet_period,
                               series_vectors=decode.series_vectors, tls=tls,
                               min_free_bytes=min_free_mb << 20)
        options = dict(batch_size=cfg.batch_size, frames=decode.frames, phi_policy=cfg.phi_policy,
                       keys=key_files(cfg), window=decode.window)
        receiver = Receiver(st, encoder, config, pool=pool, run_options=options, log=note)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        try:
            receiver.start()
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        note(f"receiving as {aet} on {host}:{receiver.port}{' (TLS)' if tls else ''} into {root}"
             f" from {', '.join(allowed)}; {len(receiver.spool.pending())} instance(s) in the "
             "spool from before")
        receiver.serve(stop)
        totals = receiver.totals
        doc = {"received": receiver.received, "refused": receiver.refused,
               "indexed": totals.indexed, "images": totals.images,
               "unchanged": totals.unchanged, "failed": totals.failed,
               "skipped": len(totals.skipped), "failures": totals.failures,
               "spooled": len(receiver.spool.pending())}
    emit(doc, json_out, _human)
