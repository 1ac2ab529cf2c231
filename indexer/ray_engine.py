"""The Ray engine: decode on CPU tasks across a Ray cluster, embed on an actor pool (one actor
per GPU, the model loaded once per actor; CPU actors on a cluster without GPUs), stream the
vectors back to this process, which routes and writes them exactly as the local engine does.

    sources (the plan: only new or changed)                          indexer.ingest
      → Ray Data map_batches(decode) on CPU tasks                    indexer.decode.decode_source
      → map_batches(Embedder, concurrency=N, num_gpus=1 | num_cpus=1)  retrieval.model
      → iter_batches on the driver → route → Store.writer() in batches  indexer.ingest

Guarantees kept: ids come only from the one writer here; a result Ray delivers twice (a task
retried, an actor restarted after it died) is dropped by (path, content hash) before writing;
a source whose task failed for good (a decoder that crashed the worker, a lost node) is
reported as failed with that reason and tried again next run. Imported only for
``--engine ray`` (importing Ray takes seconds).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray
import ray.data
import ray.exceptions
import torch
from tqdm import tqdm

from retrieval import privacy
from retrieval.errors import InputError, MedsearchError
from retrieval.model import Checkpoint
from retrieval.model.acceleration import MAX_CUDA_BATCH
from retrieval.store import Store

from .decode import Decoded, DecodeOptions, decode_source
from .ingest import IndexReport, IndexRun, Plan

#: Sources per Ray block: a decode task's unit, and what a task failing for good costs.
SOURCES_PER_BLOCK = 8
#: Why a source the cluster never returned is reported as failed.
LOST_REASON = ("the Ray cluster returned no result for this file: its decode or embedding task "
               "failed after retries (a decoder crash, a lost node; see the Ray logs); it is "
               "tried again on the next run")


@dataclass(frozen=True)
class ModelShape:
    """What the driver needs of the model (the store's manifest, the decode size) without
    loading its weights: the actors load them."""

    checkpoint: Checkpoint
    image_size: int
    dim: int

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> "ModelShape":
        return cls(checkpoint, *checkpoint.vision_shape())


@dataclass(frozen=True)
class EmbedderSpec:
    """How each actor loads its encoder (the run's settings, passed down)."""

    model: str                 # as the driver resolved it: a hub id or a folder every node has
    fingerprint: str           # the driver's checkpoint: an actor with other weights refuses
    device: str = "auto"
    precision: str = "auto"
    cuda_bf16: str = "weights"
    threads: int | None = None  # torch threads per CPU actor; None: every core of its node
    batch_size: int | None = None  # forward batch; None: from the device, as locally
    cache_dir: str | None = None
    kill_after: int | None = None   # tests only: the first actor ray.kill()s itself after
    kill_marker: str | None = None  # this many batches, once (the marker file says it did)


def connect(address: str) -> None:
    """Join the cluster at ``address`` (auto | ray://HOST:PORT | HOST:PORT), or start one in
    this process for ``local``; an already initialised Ray (a test's cluster) is used as is."""
    if ray.is_initialized():
        return
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"cannot reach the Ray cluster at {address!r}: {exc}; start one with "
                         "`ray start --head`, or use ray_address = \"local\"",
                         setting="ray_address") from None


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def _decode_block(batch: dict[str, np.ndarray], options: DecodeOptions) -> dict[str, np.ndarray]:
    """A Ray task: decode a block of sources with the local pool's steps (one thread, as a
    worker there). A source whose content is already stored under its path (only its mtime
    changed) travels on without pixels: the driver touches it, nothing is embedded."""
    torch.set_num_threads(1)
    out = []
    for blob, known_hash in zip(batch["source"], batch["known_hash"]):
        decoded = decode_source(pickle.loads(blob), options)
        if decoded.content_hash and decoded.content_hash == known_hash:
            decoded.frames = [replace(f, planes=np.zeros(0, np.float32)) for f in decoded.frames]
        out.append(pickle.dumps(decoded, protocol=5))
    return {"decoded": np.array(out, dtype=object)}


class Embedder:
    """A Ray actor holding one encoder (loaded once); decoded sources in, vectors out."""

    def __init__(self, spec: EmbedderSpec) -> None:
        from retrieval.model import VisionEncoder, resolve_checkpoint
        from retrieval.model.acceleration import auto_batch_size

        # Ray sets OMP threads from the actor's CPU share (1): the model gets its own count
        torch.set_num_threads(spec.threads or os.cpu_count() or 1)
        checkpoint = resolve_checkpoint(spec.model)
        if checkpoint.fingerprint != spec.fingerprint:
            raise RuntimeError(f"the model at {spec.model} on this node differs from the "
                               "driver's (fingerprints differ)")
        self.encoder = VisionEncoder(checkpoint, spec.device, spec.precision,
                                     cuda_bf16=spec.cuda_bf16,
                                     cache_dir=Path(spec.cache_dir) if spec.cache_dir else None)
        self.batch_size = auto_batch_size(self.encoder.device, spec.batch_size)
        self.spec, self.calls = spec, 0
        if spec.kill_marker:  # tests only: each start is noted, so a restart can be seen
            with open(spec.kill_marker + ".starts", "a") as fh:
                fh.write(f"{os.getpid()}\n")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from retrieval.model.acceleration import stack_planes

        decoded: list[Decoded] = [pickle.loads(blob) for blob in batch["decoded"]]
        planes = [f.planes for d in decoded for f in d.frames if f.planes.size]
        vectors = []
        for start in range(0, len(planes), self.batch_size):
            chunk = stack_planes(planes[start:start + self.batch_size], self.encoder.device)
            vectors.append(self.encoder.embed_batch(chunk))
        flat = iter(np.concatenate(vectors) if vectors else [])
        out_decoded, out_vectors = [], []
        for d in decoded:
            embedded = [f for f in d.frames if f.planes.size]
            own = np.array([next(flat) for _ in embedded], np.float32)
            d.frames = [replace(f, planes=np.zeros(0, np.float32)) for f in d.frames]
            out_decoded.append(pickle.dumps(d, protocol=5))
            out_vectors.append(own.tobytes())
        self.calls += 1
        self._maybe_die()
        return {"decoded": np.array(out_decoded, dtype=object),
                "vectors": np.array(out_vectors, dtype=object)}

    def _maybe_die(self) -> None:
        """Tests only: ray.kill this actor mid-run, once, with its batch not yet returned."""
        spec = self.spec
        if spec.kill_after is None or self.calls < spec.kill_after or not spec.kill_marker:
            return
        try:
            fd = os.open(spec.kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # killed once already (this is the restarted actor, or another one)
        os.close(fd)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
        time.sleep(60)  # the kill lands before this batch could be returned


class RayIndexer(IndexRun):
    """Index paths into a store on a Ray cluster; one instance per run.

    ``actors``: embedding actors (None: one per GPU of the cluster, else one CPU actor).
    ``files_per_call``: sources per actor call and per write (None: the forward batch given,
    else 256 on GPUs and ``batch_size`` on CPUs)."""

    def __init__(self, store: Store, shape: ModelShape, spec: EmbedderSpec, *,
                 actors: int | None = None, batch_size: int = 8, frames: str = "middle",
                 phi_policy: str = "hash", progress: bool | None = None, window: str = "file",
                 series_vectors: bool = False, pacs_query=None, pacs=None,
                 keys: privacy.KeyFiles | None = None) -> None:
        super().__init__(store, image_size=shape.image_size, batch_size=batch_size,
                         frames=frames, phi_policy=phi_policy, progress=progress, window=window,
                         series_vectors=series_vectors, pacs_query=pacs_query, pacs=pacs,
                         keys=keys)
        if shape.dim != store.dim:
            raise InputError(f"the model makes {shape.dim}-d vectors, the store holds {store.dim}-d")
        self.spec, self.gpus = spec, cluster_gpus()
        self.actors = actors or max(1, self.gpus)
        self.files_per_call = spec.batch_size or (MAX_CUDA_BATCH if self.gpus else self.batch_size)
        #: seconds from the start of the run to the first result back (actors starting,
        #: the model loading, the first blocks decoding): Ray's fixed cost per run
        self.first_result_s: float | None = None

    #: the decode task (a staticmethod, so a test can put a crashing one in its place)
    decode_block = staticmethod(_decode_block)

    def _dataset(self, plan: Plan) -> "ray.data.Dataset":
        rows = [{"source": pickle.dumps(s, protocol=5),
                 "known_hash": plan.known.get(s.path, (0, 0, ""))[2]} for s in plan.todo]
        blocks = min(len(rows), max(64, math.ceil(len(rows) / SOURCES_PER_BLOCK)))
        # a decode task that keeps crashing its worker must not retry forever
        decoded = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            self.decode_block, fn_kwargs={"options": self.options}, batch_size=None,
            batch_format="numpy", num_cpus=1, max_retries=2)
        gpu = {"num_gpus": 1} if self.gpus else {"num_cpus": 1}
        return decoded.map_batches(Embedder, fn_constructor_kwargs={"spec": self.spec},
                                   batch_size=self.files_per_call, batch_format="numpy",
                                   compute=ray.data.ActorPoolStrategy(size=self.actors), **gpu)

    def _stream(self, plan: Plan, report: IndexReport, bar: tqdm, started: float) -> None:
        if not plan.todo:
            return
        context = ray.data.DataContext.get_current()
        saved = (context.enable_progress_bars, context.max_errored_blocks)
        # our bar on stderr, as locally; a block failed for good becomes its files' failures
        context.enable_progress_bars, context.max_errored_blocks = False, -1
        data_log = logging.getLogger("ray.data")
        level = data_log.level
        data_log.setLevel(logging.ERROR)  # its notes (progress bars off …) are not the user's
        seen: set[tuple[str, str]] = set()
        returned: set[str] = set()
        batch: list[Decoded] = []
        vectors: list[np.ndarray] = []
        ops: list[tuple] = []
        try:
            for out in self._dataset(plan).iter_batches(batch_size=None, batch_format="numpy"):
                if self.first_result_s is None:
                    self.first_result_s = time.perf_counter() - started
                for blob, raw in zip(out["decoded"], out["vectors"]):
                    decoded: Decoded = pickle.loads(blob)
                    key = (decoded.source.path, decoded.content_hash)
                    if key in seen:  # delivered again after a retry: written once only
                        continue
                    seen.add(key)
                    returned.add(decoded.source.path)
                    bar.update(1)
                    before = len(batch)
                    self._route(decoded, plan, batch, ops, report)
                    if len(batch) > before:
                        vectors.append(np.frombuffer(raw, np.float32).reshape(-1, self.store.dim))
                    if self._due(batch, ops, self.files_per_call):
                        self._write_embedded(vectors, batch, ops, report)
                        batch, vectors, ops = [], [], []
                        self._after_write(report, bar, started)
            if not returned and len(plan.todo) > SOURCES_PER_BLOCK:
                # every block lost: the cluster is broken, not every one of the files
                raise MedsearchError("the Ray cluster returned no result at all (see its logs: "
                                     "can every node import medsearch and load the model?)")
            for source in plan.todo:
                if source.path not in returned:
                    self._route(Decoded(source, error=LOST_REASON), plan, batch, ops, report)
            self._write_embedded(vectors, batch, ops, report)
        except ray.exceptions.RayError as exc:  # committed batches stay; the next run resumes
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MedsearchError(f"the Ray cluster failed: {first}; the batches written so far "
                                 "are kept: run the command again to resume") from None
        finally:
            context.enable_progress_bars, context.max_errored_blocks = saved
            data_log.setLevel(level)

    def _write_embedded(self, vectors: list[np.ndarray], batch: list[Decoded], ops: list[tuple],
                        report: IndexReport) -> None:
        if batch or ops:
            self._write(np.concatenate(vectors) if vectors else
                        np.zeros((0, self.store.dim), np.float32), batch, ops, report)
