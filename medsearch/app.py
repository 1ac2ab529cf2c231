"""The application object: one store with its searcher, towers, decoders and their locks, shared
by the command line and the web app.

It is built once per process (``Medsearch.open``). A long-running process (the server) shares
it between threads: each tower is used under its own lock (torch modules are not safe to share
mid-forward) and the in-memory FAISS index under a third, so a text search never waits behind
an upload's encoding. Another process may index into the same store meanwhile; once
:meth:`Medsearch.watch_store` has run, every request reads the store's commit counter (SQLite's
``PRAGMA data_version``, or PostgreSQL's ``store_state`` row that every write bumps: one cheap
statement) and reconciles the in-memory index when rows were committed.
No path from a request reaches the filesystem: previews decode only paths read from the store.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from retrieval.errors import (InputError, MedsearchError, NotFoundError, StoreError,
                              UndecodableImageError)
from retrieval.filters import Filters
from retrieval.model.checkpoint import config_image_size
from retrieval.privacy import KeyFiles
from retrieval.query import Term, rocchio
from retrieval.ranking import PageOptions
from retrieval.search import Page, Result, Searcher
from retrieval.store import CommitCounter, Store

from .decoders import decode_stored as _decode_stored_row
from .decoders import decode_upload, pacs_access
from .settings import Settings

if TYPE_CHECKING:
    from retrieval.region import Region

log = logging.getLogger("medsearch.app")

#: Ids are signed 64-bit (SQLite INTEGER, PostgreSQL BIGINT); a larger one cannot name an image.
MAX_ID = 2 ** 63 - 1
#: Each label × template is one text forward pass under the text lock.
MAX_PROMPTS = 400
#: (content, kind "png" | "jpeg" | "dicom", model image size, the store's decode record) →
#: 3×S×S float32 model input.
DecodeUpload = Callable[[bytes, str, int, dict | None], np.ndarray]
#: (indexed path, frame number, model image size, the store's decode record) → model input.
DecodeStored = Callable[[str, int, int, dict | None], np.ndarray]


@dataclass
class QuerySpec:
    """A query as the application runs it, whichever command, route or body it came from."""

    terms: list[Term] = field(default_factory=list)
    upload: tuple[bytes, str] | None = None     # (content, kind)
    k: int = 10
    filters: Filters | None = None
    min_score: float | None = None
    distinct: str | None = None          # patient | study | series: best image per group
    min_prob: float | None = None        # every image whose SigLIP match prob >= this
    offset: int = 0                      # paging: skip this many rows (groups)
    dedupe: float | None = None          # drop rows this close (cosine) to a kept higher one
    relevant: list[int] = field(default_factory=list)       # Rocchio feedback
    not_relevant: list[int] = field(default_factory=list)
    region: Region | None = None         # a box on the query image (its one image term)


class Medsearch:
    """Everything a query needs over one store, shared by all requests of one process."""

    def __init__(self, store: Store, settings: Settings | None = None, *,
                 model: str | None = None, decode_upload: DecodeUpload = decode_upload,
                 decode_stored: DecodeStored | None = None, preview_cache: int = 512) -> None:
        """``model``: a checkpoint other than the one the store was built with (None: the
        store's); device, precision, threads, path redaction and key files come from
        ``settings`` (None: the defaults). Nothing here imports torch: a tower (and the thread
        count) is set up when a query first needs it. ``decode_stored`` None: the indexer's
        decode entry, fetching PACS rows as the settings say."""
        self.settings = settings = settings or Settings()
        self.store = store
        self.text_lock = threading.Lock()
        self.vision_lock = threading.Lock()
        self.store_lock = threading.RLock()
        self.searcher = Searcher(store, model, settings.device, settings.precision,
                                 settings.redact_paths, keys=self.key_files(settings),
                                 cuda_bf16=settings.cuda_bf16, cache_dir=settings.cache_folder,
                                 threads=settings.threads, text_runtime=settings.text_runtime,
                                 text_lock=self.text_lock, index_lock=self.store_lock)
        self.decode_upload = decode_upload
        self.decode_stored = decode_stored or partial(_decode_stored_row,
                                                      pacs=pacs_access(settings))
        self.decode_slots = threading.BoundedSemaphore(max(1, min(4, os.cpu_count() or 1)))
        self._commits: CommitCounter | None = None
        self._version = 0
        self._previews: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._preview_lock = threading.Lock()
        self._preview_limit = preview_cache
        self._classifier = None
        self._image_size: int | None = None
        self.started = time.time()

    @classmethod
    def from_settings(cls, settings: Settings, *, model: str | None = None,
                      readonly: bool = True) -> "Medsearch":
        """The application over the settings' store; the towers load when first used (or at
        :meth:`load_models`)."""
        return cls(Store.open(settings.store, readonly=readonly, db=settings.db), settings,
                   model=model)

    @classmethod
    def open(cls, store: str | Path, *, model: str | None = None,
             readonly: bool = True) -> "Medsearch":
        """The application over the store at ``store`` with the resolved settings otherwise."""
        return cls.from_settings(Settings.resolve(store=str(store)), model=model,
                                 readonly=readonly)

    @staticmethod
    def key_files(settings: Settings) -> KeyFiles:
        """Where the stores' patient-key secrets live, as the settings say."""
        return KeyFiles(settings.key_folder, settings.key_file)

    @property
    def decode(self) -> dict | None:
        """The decode settings the store recorded (None: made before they were recorded)."""
        return self.store.manifest.decode

    # -- life ------------------------------------------------------------------------------
    def load_models(self) -> None:
        """Load both towers now, so that a missing or mismatched checkpoint shows at start-up."""
        _ = (self.searcher.text_encoder, self.searcher.vision_encoder)

    def watch_store(self) -> None:
        """Follow rows other processes commit from now on (see :meth:`refresh`).

        The data version is read before the rows: anything committed while the models loaded
        (the store was opened before them) is picked up now, not only after the next commit."""
        with self.store_lock:
            if self._commits is None:
                self._commits = self.store.commit_counter()
            self._version = self._commits.read()
            self.store.reconcile()

    def refresh(self) -> None:
        """Pick up rows another process committed since the last request (only once
        :meth:`watch_store` has run: a one-shot command sees the store as it opened it)."""
        if self._commits is None:
            return
        with self.store_lock:
            version = self._commits.read()
            if version == self._version:
                return
            try:
                self.store.reconcile()
            except StoreError as exc:  # a write landed mid-read: try again next request
                log.warning("store refresh deferred: %s", exc)
                return
            self._version = version
            with self._preview_lock:  # previews of removed (e.g. forgotten) images go too
                cached = {i for i, _ in self._previews}
            gone = cached - set(self.store.rows(sorted(cached))) if cached else set()
            with self._preview_lock:
                for key in [k for k in self._previews if k[0] in gone]:
                    del self._previews[key]
            log.info("store changed on disk; index now holds %d vectors", self.store.count)

    def close(self) -> None:
        if self._commits is not None:
            self._commits.close()
        self.store.close()

    def __enter__(self) -> "Medsearch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def image_size(self) -> int:
        """The model's input size S (previews are S×S), from its config until the tower loads."""
        if self._image_size is None:
            vision = self.searcher._vision
            self._image_size = (vision.image_size if vision is not None
                                else config_image_size(self.searcher._checkpoint()))
        return self._image_size

    # -- queries ---------------------------------------------------------------------------
    def _check_ids(self, ids: list[int]) -> dict[int, dict]:
        """The stored rows of ``ids``; NotFoundError names the first id that has none."""
        too_large = [i for i in ids if not 0 <= i <= MAX_ID]
        if too_large:  # SQLite cannot even be asked (OverflowError): no such image
            raise NotFoundError(f"no indexed image with id {too_large[0]}")
        if not ids:
            return {}
        with self.store_lock:
            found = self.store.rows(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFoundError(f"no indexed image with id {missing[0]}")
        return found

    def embed_upload(self, content: bytes, kind: str, region=None) -> np.ndarray:
        """The unit vector of an uploaded file's bytes (``kind``: png, jpeg or dicom), or of
        only a ``region`` (retrieval.region.Region) of the image."""
        import torch

        try:
            with self.decode_slots:  # bounds the memory that concurrent large uploads take
                tensor = self.decode_upload(content, kind, self.image_size, self.decode,
                                            region=region)
        except MedsearchError as exc:
            raise UndecodableImageError(
                f"the uploaded {kind.upper()} could not be decoded: {exc}") from None
        with self.vision_lock:
            return self.searcher.vision_encoder.embed_batch(torch.from_numpy(tensor[None]))[0]

    def embed_file(self, path: str | Path, region=None) -> np.ndarray:
        """The unit vector of an image file named by the local user (never by a request),
        decoded as the store's images were."""
        from indexer.pipeline import query_image_vector

        with self.vision_lock:
            return query_image_vector(self.searcher.vision_encoder, Path(path), self.decode,
                                      region)

    def query(self, spec: QuerySpec, *, local_files: bool = False) -> list[Result]:
        """Ranked results of a query (text, ids, an upload, with arithmetic and filters): the
        rows of :meth:`page`."""
        return self.page(spec, local_files=local_files).results

    def page(self, spec: QuerySpec, *, local_files: bool = False) -> Page:
        """One page of a query's results (distinct, min_prob, dedupe, offset, relevance
        feedback as Rocchio terms: retrieval.ranking) with the expression actually run.

        File terms are read from disk only with ``local_files`` (the command line); a request
        names no path on the server."""
        self.refresh()
        terms = spec.terms
        if spec.relevant or spec.not_relevant:
            terms = rocchio(terms, spec.relevant, spec.not_relevant)
        self._check_ids([int(t.value) for t in terms if t.kind == "id"])
        term_vectors = self._region_vector(spec, local_files) if spec.region else None
        if spec.upload and not term_vectors:
            upload_vector = self.embed_upload(*spec.upload)
            image_vector = lambda term: upload_vector  # noqa: E731
        else:
            image_vector = (lambda term: self.embed_file(term.value)) if local_files else None
        opts = PageOptions(k=spec.k, offset=spec.offset, distinct=spec.distinct,
                           dedupe=spec.dedupe)
        return self.searcher.page(terms, opts, spec.filters, spec.min_score, spec.min_prob,
                                  image_vector=image_vector, term_vectors=term_vectors)

    def _region_vector(self, spec: QuerySpec, local_files: bool) -> dict[Term, np.ndarray]:
        """The vector of the query image's region, for its one image term."""
        images = [t for t in spec.terms if t.kind != "text"]
        if len(images) != 1:
            raise InputError("a region applies to one query image: give exactly one image (an "
                             "upload, one #id or one file) with it", setting="region")
        term, region = images[0], spec.region
        if term.kind == "upload":
            return {term: self.embed_upload(*spec.upload, region=region)}
        if term.kind == "file":
            if not local_files:
                raise InputError("a file term is read only on the command line", setting="region")
            return {term: self.embed_file(term.value, region=region)}
        row = self._check_ids([int(term.value)])[int(term.value)]
        meta = row["metadata"]
        try:  # checked on the stored size first: a clear reason, and no decoding for nothing
            region.box(int(meta["width"]), int(meta["height"]), self.image_size)
        except ValueError as exc:
            raise InputError(str(exc), setting="region") from None
        return {term: self.embed_stored(row, region)}

    def embed_stored(self, row: dict, region=None) -> np.ndarray:
        """The unit vector of an indexed image decoded again (only ``region`` of it)."""
        import torch

        try:
            with self.decode_slots:
                tensor = self.decode_stored(row["path"], int(row["frame"]), self.image_size,
                                            self.decode, region=region)
        except MedsearchError as exc:
            reason = str(exc).replace(row["path"], self.searcher.redact(row["path"]))
            raise NotFoundError(f"image {row['id']} cannot be read again: {reason}") from None
        with self.vision_lock:
            return self.searcher.vision_encoder.embed_batch(torch.from_numpy(tensor[None]))[0]

    def classify(self, image_id: int | None = None, upload: tuple[bytes, str] | None = None,
                 labels: list[str] | None = None, preset: str | None = None,
                 templates: list[str] | None = None, max_entropy: float = 0.8,
                 min_margin: float = 0.1) -> dict:
        """Zero-shot scores (retrieval.zeroshot) of a stored vector or an uploaded image."""
        from retrieval.zeroshot import (ReviewThresholds, ZeroShotClassifier, classifications,
                                        read_logit_scalars, resolve_labels)

        chosen, prompts = resolve_labels(labels, preset, templates)
        if len(chosen) * len(prompts) > MAX_PROMPTS:
            raise InputError(f"too many prompts: {len(chosen)} labels × {len(prompts)} templates "
                             f"is over {MAX_PROMPTS}; use fewer labels or templates")
        self.refresh()
        if upload is not None:
            vector = self.embed_upload(*upload)
        else:
            self._check_ids([image_id])
            vector = self.store.vectors([image_id])[0]
        with self.text_lock:
            if self._classifier is None:
                text = self.searcher.text_encoder
                self._classifier = ZeroShotClassifier(text, read_logit_scalars(text.checkpoint))
            if len(self._classifier._label_cache) > 64:  # bound memory under arbitrary labels
                self._classifier._label_cache.clear()
            scores = self._classifier.scores(vector[None, :], chosen, prompts)
        return classifications(scores, ReviewThresholds(max_entropy, min_margin))[0].to_json()

    # -- stored images and the store ---------------------------------------------------------
    def _stored_row(self, image_id: int) -> dict:
        self.refresh()
        return self._check_ids([image_id])[image_id]

    def row(self, image_id: int) -> dict:
        """One indexed image's stored metadata, its path shown as ``redact_paths`` says."""
        return self.searcher.redact.row(self._stored_row(image_id))

    def duplicates(self, threshold: float = 0.98, *, slices: bool = False,
                   limit: int | None = None) -> dict:
        """Groups of near-identical stored images (retrieval.duplicates), each member's path
        shown as ``redact_paths`` says; ``limit`` caps the groups listed, not those counted."""
        from retrieval.duplicates import store_duplicates

        self.refresh()
        # database reads only: searches (which need the index lock) go on meanwhile
        found = store_duplicates(self.store, threshold, slices=slices)
        listed = found["groups"][:limit] if limit is not None else found["groups"]
        rows = self.store.rows(sorted({i for g in listed for i in g["ids"]}))
        for group in listed:
            group["images"] = [{"id": i, "path": self.searcher.redact(rows[i]["path"]),
                                "frame": rows[i]["frame"]} for i in group["ids"] if i in rows]
        found.update(groups_total=len(found["groups"]), groups=listed)
        return found

    def info(self) -> dict:
        """Model, dimension, counts and index type of the store (`medsearch info`, /stats)."""
        self.refresh()
        with self.store_lock:
            st, m = self.store, self.store.manifest
            return {"model": m.model, "dim": m.dim, "count": st.count,
                    "index_type": m.index_type, "index_auto": m.index_auto,
                    "index_reason": m.index_reason, **st.index_status(),
                    **st.vector_index.layout(),  # index_shards, shard_sizes
                    "model_revision": m.model_revision,
                    "preprocessing_version": m.preprocessing_version, **st.stats(),
                    "index_maintenance_due": st.maintenance_due(),
                    "decode": self.decode_settings().to_json(),
                    "decode_recorded": m.decode is not None,
                    "patient_keys": st.db.has_patient_keys(), "image_size": self._size_or_none()}

    def _size_or_none(self) -> int | None:
        """The model's input size if known without a download (the server has loaded the
        towers; a local checkpoint folder has its config); else None."""
        if (self._image_size is None and self.searcher._vision is None
                and not Path(self.searcher.model_name).expanduser().is_dir()):
            return None
        try:
            return self.image_size
        except MedsearchError:  # the checkpoint is not here: the store's figures still are
            return None

    def decode_settings(self):
        """How the store's images became model inputs (indexer.view.DecodeSettings); the
        defaults for a store made before they were recorded."""
        from indexer.decode_settings import DecodeSettings

        return DecodeSettings.from_manifest(self.decode)

    def preview(self, image_id: int, size: int | None = None) -> bytes:
        """PNG of exactly what the model saw for this image, optionally scaled down."""
        import torch
        from PIL import Image

        from retrieval.model.preprocess import model_input_to_uint8

        size = min(size or self.image_size, self.image_size)
        key = (image_id, size)
        row = self._stored_row(image_id)  # first: a removed image is never served from the cache
        with self._preview_lock:
            if key in self._previews:
                self._previews.move_to_end(key)
                return self._previews[key]
        try:
            tensor = self.decode_stored(row["path"], int(row["frame"]), self.image_size,
                                        self.decode)
        except MedsearchError as exc:
            reason = str(exc).replace(row["path"], self.searcher.redact(row["path"]))
            raise NotFoundError(
                f"the source of image {image_id} can no longer be read: {reason}") from None
        image = Image.fromarray(model_input_to_uint8(torch.from_numpy(np.asarray(tensor))))
        if size < image.width:
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        image.save(out, format="PNG")
        data = out.getvalue()
        with self._preview_lock:
            self._previews[key] = data
            while len(self._previews) > self._preview_limit:
                self._previews.popitem(last=False)
        return data

