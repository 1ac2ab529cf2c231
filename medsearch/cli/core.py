"""The core commands: make-test-model, index, remove, search, similar, info, embed, reindex."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional

import typer

from retrieval.errors import InputError, NotFoundError, storage_error
from retrieval.model.checkpoint import resolve_checkpoint

from . import remote
from .main import app
from .options import (DbOpt, BodyPartOpt, CallingAetOpt, DateFromOpt, DateToOpt, DeviceOpt, JsonOpt,
                      KOpt, LabelOpt, MinScoreOpt, ModalityOpt, ModelOpt, PacsTimeoutOpt,
                      PacsUserOpt, PathGlobOpt, PrecisionOpt, StoreOpt, TlsCaOpt, TlsCertOpt,
                      TlsKeyOpt, TlsOpt, build_filters, key_files, open_for_writing,
                      resolve, store_root, text_encoder, vision_encoder)
from .output import emit, note, results_table
from .remote import LocalOpt
from .query_options import (DedupeOpt, DistinctOpt, MinProbOpt, NotRelevantOpt, OffsetOpt,
                            RegionOpt, RegionSpaceOpt, RelevantOpt, spec_fields)

if TYPE_CHECKING:  # SQLAlchemy and the store load when a command opens one
    from indexer.decode_settings import DecodeSettings
    from retrieval.model.encoders import VisionEncoder
    from retrieval.store import Store

    from ..settings import Settings


@app.command("make-test-model")
def make_test_model_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into.")],
    json_out: JsonOpt = False,
) -> None:
    """Write a tiny random SigLIP checkpoint (for tests and demos; rankings are meaningless)."""
    from retrieval.model.testmodel import make_test_model

    path = make_test_model(directory)
    emit({"path": str(path.absolute())}, json_out,
         lambda d: f"tiny random SigLIP written to {d['path']} (not a real model: for testing only)")


def _index_human(d: dict) -> str:
    lines = [f"indexed {d['indexed']} file(s) ({d['images']} image(s)), unchanged {d['unchanged']}, "
             f"renamed {d['renamed']}, removed {d['removed']}, failed {d['failed']}, "
             f"skipped {len(d['skipped'])}, total {d['total']} in {d['seconds']:.1f} s"]
    for f in d["failures"]:
        lines.append(f"  failed: {f['path']}: {f['reason']}")
    for s in d["skipped"]:
        lines.append(f"  skipped: {s['path']}: {s['reason']}")
    for w in d.get("warnings", []):
        lines.append(f"  warning: {w['path']}: {w['reason']}")
    for p in d.get("prune_skipped", []):
        lines.append(f"  not removing missing files under {p['root']}: {p['reason']}")
    return "\n".join(lines)


@app.command("index")
def index_cmd(
    paths: Annotated[list[str], typer.Argument(
        help="Files and folders to index, or a PACS: dicomweb+http(s)://HOST:PORT/dicom-web "
             "or dimse://AET@HOST:PORT.")],
    store: StoreOpt = None, db: DbOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Images per forward pass.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Decode processes (0: inline).")] = None,
    frames: Annotated[Optional[str], typer.Option(help="Multi-frame policy: all|first|middle|N.")] = None,
    phi: Annotated[Optional[str], typer.Option("--phi", help="Patient key policy: hash|keep|drop.")] = None,
    index_type: Annotated[Optional[str], typer.Option(
        help="FAISS factory string for a new store, or auto (chosen by size and memory).")] = None,
    precision: PrecisionOpt = None,
    progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress")] = None,
    window: Annotated[Optional[str], typer.Option(
        help="DICOM grey window: file (the file's first window; the default), auto "
             "(percentiles), or a CT preset: lung, mediastinum, bone, brain, abdomen, liver. "
             "A store keeps the one it was made with.")] = None,
    series_vectors: Annotated[bool, typer.Option(
        "--series-vectors", help="Also store one vector per DICOM series (mean of its frames).")] = False,
    study: Annotated[Optional[str], typer.Option(help="PACS: only this StudyInstanceUID.")] = None,
    modality_filter: Annotated[Optional[str], typer.Option(
        "--modality", help="PACS: only this modality, e.g. CT.")] = None,
    since: Annotated[Optional[str], typer.Option(help="PACS: studies on or after YYYY-MM-DD.")] = None,
    calling_aet: CallingAetOpt = None, pacs_user: PacsUserOpt = None, tls: TlsOpt = None,
    tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
    pacs_timeout: PacsTimeoutOpt = None,
    decode_timeout: Annotated[float, typer.Option(
        min=1, help="Seconds one file may take to decode before it is reported as failed.")] = 300.0,
    engine: Annotated[Optional[str], typer.Option(
        help="local (this machine's processes) or ray (decode and embed on a Ray cluster).")] = None,
    ray_address: Annotated[Optional[str], typer.Option(
        help="--engine ray: local (start a cluster here), auto (the running cluster, "
             "`ray start --head`) or ray://HOST:PORT.")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(
        min=1, help="--engine ray: embedding actors (default: one per GPU, else one).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Embed every image under PATHS into the store (incremental and resumable)."""
    from indexer.pacs import PacsQuery, dicom_date, is_pacs
    from indexer.pipeline import Indexer, decode_pool
    from indexer.pixels import check_window_choice

    from ..decoders import pacs_access

    cfg = resolve(store=store, db=db, device=device, precision=precision, batch_size=batch_size,
                  workers=workers, frames=frames, phi_policy=phi, index_type=index_type,
                  engine=engine, ray_address=ray_address, ray_actors=ray_actors,
                  pacs_calling_aet=calling_aet, pacs_user=pacs_user, pacs_tls=tls,
                  pacs_tls_ca=tls_ca, pacs_tls_cert=tls_cert, pacs_tls_key=tls_key,
                  pacs_timeout=pacs_timeout)
    root = store_root(cfg)
    access = pacs_access(cfg)
    try:
        window = None if window is None else check_window_choice(window)
        query = PacsQuery(study, modality_filter, dicom_date(since) if since else None)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if query.filtered and not any(is_pacs(p) for p in paths):
        raise InputError("--study, --modality and --since apply to PACS sources only "
                         "(dicomweb+http(s):// or dimse://)")
    missing = [p for p in paths if not is_pacs(p) and not Path(p).expanduser().exists()]
    if missing:
        raise NotFoundError(f"no such file or folder: {', '.join(missing)}")
    ray = cfg.engine == "ray"
    # decode workers start now, while the model loads (each needs seconds to import)
    with _store_faults(root), (decode_pool(cfg.workers, timeout_s=decode_timeout)
                               if cfg.workers != 0 and not ray else nullcontext()) as pool:
        # a model named on the command line, else the store's own, else the configured one
        checkpoint = resolve_checkpoint(model or _store_model(root) or cfg.model)
        if ray:  # the actors load the model; the driver only needs its shape
            from indexer.ray_engine import ModelShape, connect

            connect(cfg.ray_address)
            encoder = ModelShape.of(checkpoint)
        else:
            encoder = vision_encoder(cfg, checkpoint, compile=cfg.compile)
        batch = cfg.batch_size
        if batch_size is None and not ray and encoder.device.type == "cuda":  # fill the GPU
            from retrieval.model.acceleration import auto_batch_size

            batch = max(cfg.batch_size, auto_batch_size(encoder.device))
        # the writer lock is taken before the store is created (two runs never both create it,
        # nor mix models) and held until it is closed, also when the run fails
        with store_for_run(root, encoder, cfg, window=window, frames=frames,
                           series_vectors=series_vectors, exclusive=True) as (st, decode):
            common = dict(batch_size=batch, frames=decode.frames, phi_policy=cfg.phi_policy,
                          keys=key_files(cfg), progress=progress, window=decode.window,
                          series_vectors=decode.series_vectors, pacs_query=query, pacs=access)
            if ray:
                indexer = _ray_indexer(cfg, st, encoder, batch_size, common)
            else:
                note(f"indexing into {root} with {encoder.checkpoint.name} on {encoder.device}")
                indexer = Indexer(st, encoder, workers=0 if pool is None else None, pool=pool,
                                  **common)
            try:
                report = indexer.run(paths)
            except ConnectionError as exc:
                raise InputError(f"{exc}; is the server running and the address right?") from None
    emit(report.to_json(), json_out, _index_human)


def _ray_indexer(cfg, st: Store, shape, batch_size: int | None, common: dict):
    """The Ray engine's indexer, its actors loading the model as this run's settings say."""
    from indexer.ray_engine import EmbedderSpec, RayIndexer

    checkpoint = shape.checkpoint
    spec = EmbedderSpec(str(checkpoint.path) if checkpoint.revision == "local" else checkpoint.name,
                        checkpoint.fingerprint, cfg.device, cfg.precision, cfg.cuda_bf16,
                        threads=cfg.threads, batch_size=batch_size,
                        cache_dir=str(cfg.cache_folder))
    indexer = RayIndexer(st, shape, spec, actors=cfg.ray_actors, **common)
    note(f"indexing into {st.root} with {checkpoint.name} on a Ray cluster: {indexer.actors} "
         f"embedding actor(s) on {'GPUs' if indexer.gpus else 'CPUs'}")
    return indexer


@contextmanager
def _store_faults(root: Path):
    """A full or failing disk ends the command with what happened and what to do, not a
    traceback; SQLite has rolled back the batch in flight and the index file is replaced
    only by a complete one, so the store keeps its last committed state."""
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except (OSError, OperationalError, RuntimeError) as exc:
        error = storage_error(root, exc)
        if error is None:
            raise
        raise error from None


@app.command("remove")
def remove_cmd(
    paths: Annotated[list[str], typer.Argument(
        help="Files or folders whose stored images to remove (they need not exist any more).")],
    store: StoreOpt = None, db: DbOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove stored sources at or under PATHS: rows, vectors, labels and index entries.

    `index` never removes anything under a folder it cannot read or finds empty (an unmounted
    share looks like that); this is how to drop such entries on purpose."""
    from indexer.sources import under_any

    cfg = resolve(store=store, db=db)
    root = store_root(cfg)
    targets = [str(Path(p).expanduser().absolute()) for p in paths]
    with _store_faults(root), open_for_writing(cfg) as st:
        found = st.known_files(targets)
        with st.writer() as writer:
            failed = [path for path in writer.failure_paths() if under_any(path, targets)]
            images = writer.remove_files(sorted(found))
            for path in failed:
                writer.clear_failure(path)
    not_found = [t for t in targets if not any(under_any(p, [t]) for p in [*found, *failed])]
    emit({"removed_files": len(found), "removed_images": images, "cleared_failures": len(failed),
          "paths": sorted(found), "not_found": not_found}, json_out, _remove_human)


def _remove_human(d: dict) -> str:
    lines = [f"removed {d['removed_files']} file(s) ({d['removed_images']} image(s)) and "
             f"{d['cleared_failures']} failure record(s)"]
    lines += [f"  removed: {p}" for p in d["paths"]]
    lines += [f"  nothing stored at or under {p}" for p in d["not_found"]]
    return "\n".join(lines)


@contextmanager
def store_for_run(root: Path, encoder: VisionEncoder, cfg: Settings, *, window: str | None,
                  frames: str | None, series_vectors: bool | None,
                  exclusive: bool = False) -> Iterator[tuple[Store, DecodeSettings]]:
    """(the store to index into, the decode settings in effect): a new store records this
    run's; an existing one's are used (a choice given here that differs is refused)."""
    from indexer.view import settings_for_run
    from retrieval.store import Store, manifest_for

    decode = settings_for_run(None, window=window, frames=frames, series_vectors=series_vectors,
                              default_frames=cfg.frames)
    manifest = manifest_for(encoder, cfg.index_type)
    manifest.decode = decode.to_json()
    with Store.open_or_create(root, manifest, exclusive=exclusive, db=cfg.db) as st:
        if st.manifest.decode is not None:
            decode = settings_for_run(st.manifest.decode, window=window, frames=frames,
                                      series_vectors=series_vectors)
        yield st, decode


def _store_model(root: Path) -> str | None:
    """An existing store remembers its model, so later runs need no --model."""
    from retrieval.store import Manifest

    manifest = root / "manifest.json"
    return Manifest.read(manifest).model if manifest.is_file() else None


@app.command("search")
def search_cmd(
    text: Annotated[str, typer.Argument(help="What to look for, e.g. 'left pneumothorax'; "
                                        "arithmetic works: '\"pleural effusion\" - \"chest tube\"', "
                                        "'2:\"effusion\" + scan.png', '#17 - \"tube\"'.")],
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, device: DeviceOpt = None, k: KOpt = None,
    min_score: MinScoreOpt = None, modality: ModalityOpt = None, body_part: BodyPartOpt = None,
    date_from: DateFromOpt = None, date_to: DateToOpt = None, path_glob: PathGlobOpt = None,
    label: LabelOpt = None, precision: PrecisionOpt = None, distinct: DistinctOpt = None,
    min_prob: MinProbOpt = None, offset: OffsetOpt = 0, dedupe: DedupeOpt = None,
    relevant: RelevantOpt = None, not_relevant: NotRelevantOpt = None, json_out: JsonOpt = False,
    local: LocalOpt = False,
) -> None:
    """Find images by a text description (or weighted text/image terms: query arithmetic);
    a running `medsearch serve` for the store answers when there is one (see --local)."""
    from retrieval.query import parse_query

    terms = parse_query(text, allow_files=True)
    cfg = resolve(store=store, db=db, device=device, precision=precision, k=k)
    filters = build_filters(modality, body_part, date_from, date_to, path_glob, label)
    fields = spec_fields(distinct, min_prob, offset, dedupe, relevant, not_relevant)
    doc = remote.page(cfg, store_root(cfg), terms, local=local, model=model, filters=filters,
                      min_score=min_score, fields=fields)
    if doc is None:
        from ..app import Medsearch, QuerySpec

        with Medsearch.from_settings(cfg, model=model) as found:
            spec = QuerySpec(terms, k=cfg.k, filters=filters, min_score=min_score, **fields)
            doc = found.page(spec, local_files=True).to_json()
    emit(doc, json_out, results_table)


@app.command("similar")
def similar_cmd(
    file: Annotated[Optional[Path], typer.Argument(help="Query image (PNG, JPEG, DICOM …).")] = None,
    image_id: Annotated[Optional[int], typer.Option("--id", help="Use an indexed image's stored vector.")] = None,
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, device: DeviceOpt = None, k: KOpt = None,
    min_score: MinScoreOpt = None, modality: ModalityOpt = None, body_part: BodyPartOpt = None,
    date_from: DateFromOpt = None, date_to: DateToOpt = None, path_glob: PathGlobOpt = None,
    label: LabelOpt = None, distinct: DistinctOpt = None, offset: OffsetOpt = 0,
    dedupe: DedupeOpt = None, relevant: RelevantOpt = None, not_relevant: NotRelevantOpt = None,
    region: RegionOpt = None, region_space: RegionSpaceOpt = "image", json_out: JsonOpt = False,
    local: LocalOpt = False,
) -> None:
    """Find similar cases for an image file, or for an indexed image by --id (or a --region
    of either); a running `medsearch serve` for the store answers --id when there is one."""
    from retrieval.query import Term
    from retrieval.region import Region

    if (file is None) == (image_id is None):
        raise InputError("give either a FILE or --id N (one of them)")
    cfg = resolve(store=store, db=db, device=device, k=k)
    filters = build_filters(modality, body_part, date_from, date_to, path_glob, label)
    terms = [Term("id", image_id, 1.0) if image_id is not None else Term("file", str(file), 1.0)]
    fields = spec_fields(distinct, None, offset, dedupe, relevant, not_relevant)
    box = Region.parse(region, region_space)
    doc = remote.page(cfg, store_root(cfg), terms, local=local, model=model, filters=filters,
                      min_score=min_score, fields=fields, region=box)
    if doc is None:
        from ..app import Medsearch, QuerySpec

        with Medsearch.from_settings(cfg, model=model) as found:
            spec = QuerySpec(terms, k=cfg.k, filters=filters, min_score=min_score, **fields,
                             region=box)
            doc = found.page(spec, local_files=True).to_json()
    emit(doc, json_out, results_table)


@app.command("info")
def info_cmd(store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False,
             local: LocalOpt = False) -> None:
    """Store statistics: model, dimension, counts, index type; what --precision auto picks
    here (a running `medsearch serve` for the store answers when there is one)."""
    from retrieval.model.cpu_choice import precision_auto

    cfg = resolve(store=store, db=db)
    doc = remote.info(cfg, store_root(cfg), local=local)
    if doc is None:
        from ..app import Medsearch

        with Medsearch.from_settings(cfg) as found:
            doc = found.info()
    doc["precision_auto"] = precision_auto(cfg.device, cfg.cache_folder, cfg.threads)
    if not doc["decode_recorded"]:
        note("decode settings not recorded; defaults assumed")
    emit(doc, json_out, lambda d: "\n".join(f"{k:>22}: {v}" for k, v in d.items()))


@app.command("embed")
def embed_cmd(
    image: Annotated[Optional[Path], typer.Option("--image", help="Image or DICOM file.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Text to embed.")] = None,
    model: ModelOpt = None, device: DeviceOpt = None,
    frames: Annotated[str, typer.Option(help="Multi-frame policy: all|first|middle|N.")] = "all",
    json_out: JsonOpt = False,
) -> None:
    """Print the L2-normalised embedding(s) of an image (one per frame) or a text."""
    import torch

    from indexer.view import DecodeSettings, read_images

    if (image is None) == (text is None):
        raise InputError("give exactly one of --image FILE or --text TEXT")
    cfg = resolve(model=model, device=device)
    checkpoint = resolve_checkpoint(cfg.model)
    if text is not None:
        vectors = text_encoder(cfg, checkpoint).embed([text])
    else:
        encoder = vision_encoder(cfg, checkpoint)
        images = read_images(image, image_size=encoder.image_size,
                             settings=DecodeSettings(frames=frames))
        import numpy as np

        vectors = encoder.embed_batch(torch.from_numpy(np.stack([i.tensor for i in images])))
    doc = {"model": checkpoint.name, "dim": int(vectors.shape[1]),
           "vectors": [[float(x) for x in v] for v in vectors]}
    emit(doc, json_out, lambda d: "\n".join(" ".join(f"{x:.6f}" for x in v) for v in d["vectors"]))


@app.command("reindex")
def reindex_cmd(
    index_type: Annotated[Optional[str], typer.Option(help="FAISS factory string, e.g. Flat, HNSW32, IVF1024,SQ8; or auto (by size and memory). Default: the store's type.")] = None,
    shards: Annotated[Optional[int], typer.Option(min=1, help="Split the index into N shards by id (id % N), trained as one index, searched in parallel and merged; 1: one index again. Default: the store's layout.")] = None,
    store: StoreOpt = None, db: DbOpt = None, json_out: JsonOpt = False,
) -> None:
    """Rebuild the FAISS index from the stored vectors (no re-embedding)."""
    cfg = resolve(store=store, db=db)
    with _store_faults(store_root(cfg)), open_for_writing(cfg) as st:
        st.rebuild(index_type or st.manifest.index_type, shards)
        st.maintain_index()
    emit({"index_type": st.manifest.index_type, "count": st.count, **st.index_status(),
          **st.vector_index.layout()}, json_out, _reindex_human)


def _reindex_human(doc: dict) -> str:
    text = f"rebuilt {doc['count']} vectors as {doc['index_type']}"
    if doc["index_shards"] > 1:
        text += f" in {doc['index_shards']} shards ({', '.join(map(str, doc['shard_sizes']))})"
    if doc["index_waiting_for"]:
        text += (f"; searched exactly until {doc['index_waiting_for']:,} vectors are stored "
                 "to train it")
    return text
