"""Queries over a store: text, an image's pixels, or an indexed id → ranked results with metadata."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError, ModelMismatchError, NotFoundError
from .filters import Filters
from .model.checkpoint import resolve_checkpoint
from .model.names import effective_text_runtime
from .privacy import KeyFiles, PathRedactor, text_cache_secret
from .store import Store

if TYPE_CHECKING:  # the towers import torch: only when a query needs one
    from .model.encoders import TextEncoder, VisionEncoder


@dataclass
class Result:
    id: int
    path: str
    frame: int
    score: float
    metadata: dict
    prob: float | None = None          # SigLIP match probability, text-only queries
    group_count: int | None = None     # with distinct: images of the group the query admits

    def to_json(self) -> dict:
        doc = {"id": self.id, "path": self.path, "frame": self.frame,
               "score": round(float(self.score), 6), "metadata": self.metadata}
        if self.prob is not None:
            doc["prob"] = round(float(self.prob), 6)
        if self.group_count is not None:
            doc["group_count"] = self.group_count
        return doc


@dataclass
class Page:
    """One page of results, where the next starts (None: no more), and the query as run."""

    results: list[Result]
    offset: int = 0
    next_offset: int | None = None
    query_expression: str = ""

    def to_json(self) -> dict:
        return {"results": [r.to_json() for r in self.results], "offset": self.offset,
                "next_offset": self.next_offset, "query_expression": self.query_expression}


class Searcher:
    """Loads each tower lazily, from the checkpoint the store was built with unless told otherwise."""

    def __init__(self, store: Store, model: str | None = None, device: str = "auto",
                 precision: str = "auto", redact_paths: str = "none", *,
                 keys: KeyFiles | None = None, cuda_bf16: str = "weights",
                 cache_dir: Path | None = None, threads: int | None = None,
                 text_runtime: str = "torch",
                 text_lock: AbstractContextManager | None = None,
                 index_lock: AbstractContextManager | None = None) -> None:
        """``redact_paths``: none | name | hash (retrieval.privacy.PathRedactor), keyed with the
        store's patient key found in ``keys``; ``cuda_bf16`` and ``cache_dir`` go to the
        encoders. The caller passes the settings' values, so the CLI, the server and exports
        all follow them. ``text_lock`` and ``index_lock`` are held by :meth:`query` while it
        builds the query vector and while it ranks, so that a server's threads share the towers
        and the index (the application object owns them; one-shot commands need none)."""
        self.redact = PathRedactor(store, redact_paths, keys)
        self.cuda_bf16, self.cache_dir = cuda_bf16, cache_dir
        self.threads = threads  # torch intra-op threads, set when a tower loads (None: one per core)
        self.text_runtime = effective_text_runtime(text_runtime, device)
        self.store = store
        self.model_name = model or store.manifest.model
        self.device = device
        self.precision = precision
        self._text: TextEncoder | None = None
        self._text_cache = None  # retrieval.store.text_cache.TextVectorCache, when first used
        self.keys = keys
        self._vision: VisionEncoder | None = None
        self._resolved = None  # the checkpoint, resolved and checked once (see _checkpoint)
        self.text_lock = text_lock or nullcontext()
        self.index_lock = index_lock or nullcontext()

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text is None and self.text_runtime == "onnx":
            from .model.onnx_text import OnnxTextEncoder
            from .userdirs import cache_home

            self._text = OnnxTextEncoder(self._checkpoint(), Path(self.cache_dir or cache_home()),
                                         threads=self.threads)
        if self._text is None:
            from .model.acceleration import configure_cpu_threads
            from .model.encoders import TextEncoder

            configure_cpu_threads(self.threads)
            self._text = TextEncoder(self._checkpoint(), self.device, self.precision,
                                     cache_dir=self.cache_dir)
        return self._text

    @property
    def vision_encoder(self) -> VisionEncoder:
        if self._vision is None:
            from .model.acceleration import configure_cpu_threads
            from .model.encoders import VisionEncoder

            configure_cpu_threads(self.threads)
            self._vision = VisionEncoder(self._checkpoint(), self.device, self.precision,
                                         cuda_bf16=self.cuda_bf16, cache_dir=self.cache_dir)
        return self._vision

    def _checkpoint(self):
        """The checkpoint, resolved (config read, weights fingerprinted) once per searcher."""
        if self._resolved is not None:
            return self._resolved
        checkpoint = resolve_checkpoint(self.model_name)
        if checkpoint.fingerprint != self.store.manifest.model_fingerprint:
            raise ModelMismatchError(
                f"model {self.model_name!r} is not the one store {self.store.root} was built with "
                f"({self.store.manifest.model!r}); its vectors would not be comparable. "
                "Use the store's checkpoint as the model.")
        self._resolved = checkpoint
        return checkpoint

    # -- query vectors ---------------------------------------------------------------------
    def text_vector(self, text: str) -> np.ndarray:
        """A query text's vector: from the persistent cache when it was asked before (the
        text tower is then not loaded at all), else from the tower, then remembered."""
        if not text or not text.strip():
            raise InputError("the query text is empty")
        text = text.strip()
        cache = self.text_cache
        if cache is not None and (vector := cache.get(text)) is not None:
            return vector
        vector = self.text_encoder.embed_cached(text)
        if cache is not None:
            cache.put(text, vector)
        return vector

    @property
    def text_cache(self):
        """The per-user text-embedding cache for this store's checkpoint (None: a checkpoint
        other than the store's was named, or no cache folder was given)."""
        if self._text_cache is None and self.cache_dir is not None \
                and self.model_name == self.store.manifest.model:
            from .store.text_cache import TextVectorCache

            secret = text_cache_secret(self.store, self.keys, Path(self.cache_dir))
            self._text_cache = TextVectorCache(
                Path(self.cache_dir) / "text-embeddings", secret,
                self.store.manifest.model_fingerprint,
                f"{self.device}/{self.precision}/{self.text_runtime}")
        return self._text_cache

    def id_vector(self, image_id: int) -> np.ndarray:
        """An indexed image's stored vector as a unit query vector: stored as float16, its
        norm is 1 only to ~1e-4, and every path (similar by id, #id terms) must score alike."""
        if not self.store.rows([image_id]):
            raise NotFoundError(f"no indexed image with id {image_id}")
        vector = self.store.vectors([image_id])[0]
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector

    # -- ranking ---------------------------------------------------------------------------
    def by_vector(self, vector: np.ndarray, k: int = 10, filters: Filters | None = None,
                  min_score: float | None = None, exclude: set[int] | None = None) -> list[Result]:
        """Top-k results for one unit query vector; ``exclude`` drops ids (e.g. the query itself)."""
        extra = len(exclude or ())
        scores, ids = self.store.search(vector[None, :], k + extra, filters)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0])
                if i >= 0 and int(i) not in (exclude or ())]
        if min_score is not None:
            hits = [(i, s) for i, s in hits if s >= min_score]
        hits = hits[:k]
        rows = self.store.rows([i for i, _ in hits])
        return [Result(i, self.redact(rows[i]["path"]), rows[i]["frame"], s, rows[i]["metadata"])
                for i, s in hits if i in rows]

    def text(self, text: str, k: int = 10, filters: Filters | None = None,
             min_score: float | None = None) -> list[Result]:
        return self.by_vector(self.text_vector(text), k, filters, min_score)

    def similar_id(self, image_id: int, k: int = 10, filters: Filters | None = None,
                   min_score: float | None = None, include_self: bool = False) -> list[Result]:
        """Reuses the stored vector: no decoding, no model."""
        exclude = None if include_self else {image_id}
        return self.by_vector(self.id_vector(image_id), k, filters, min_score, exclude)

    # -- query arithmetic (retrieval.query) ----------------------------------------------------
    def terms_vector(self, terms: list, image_vector=None,
                     term_vectors: dict | None = None) -> np.ndarray:
        """Combine weighted text / #id / image terms; ``image_vector(term)`` embeds file or
        upload terms (the caller decodes them: retrieval never reads arbitrary files);
        ``term_vectors`` gives the vector of particular terms (e.g. a region of an image)."""
        from .query import query_vector

        def vector_of(term) -> np.ndarray:
            if term_vectors and term in term_vectors:
                return term_vectors[term]
            if term.kind == "text":
                return self.text_vector(term.value)
            if term.kind == "id":
                return self.id_vector(int(term.value))
            if image_vector is None:
                raise InputError(f"image term {term.value!r} cannot be used here")
            return image_vector(term)

        return query_vector(terms, vector_of)

    def logit_scalars(self):
        """The checkpoint's (logit_scale, logit_bias), or None when its weights lack them;
        remembered in the text cache, so a cached query reads no weights file either."""
        from .errors import ModelUnavailableError
        from .zeroshot import LogitScalars, read_logit_scalars

        cache = self.text_cache
        known = cache.fact("logit_scalars") if cache is not None else None
        if isinstance(known, list) and len(known) == 2:
            return LogitScalars(float(known[0]), float(known[1]))
        try:
            scalars = read_logit_scalars(self._checkpoint())
        except ModelUnavailableError:
            return None
        if cache is not None:
            cache.remember("logit_scalars", [scalars.scale, scalars.bias])
        return scalars

    def page(self, terms: list, opts, filters: Filters | None = None,
             min_score: float | None = None, min_prob: float | None = None,
             image_vector=None, term_vectors: dict | None = None) -> Page:
        """One page of a query with arithmetic (retrieval.ranking: thresholds, distinct,
        dedupe, paging); positive #id terms are the query's examples and left out. Text-only
        queries carry ``prob``: SigLIP's sigmoid of the query vector's cosine (for one text
        term, that text's match probability); ``min_prob`` is refused for other queries."""
        from .query import expression
        from .ranking import check_patient_keys, prob_threshold, probability, rank_page

        text_only = all(t.kind == "text" for t in terms)
        if min_prob is not None and not text_only:
            raise InputError("min_prob applies to text-only queries: it is SigLIP's text–image "
                             "match probability, and image terms (#id, files, uploads, relevance "
                             "feedback) have no text to match; use min_score instead",
                             setting="min_prob")
        if opts.distinct == "patient":
            check_patient_keys(self.store)
        scalars = self.logit_scalars() if text_only else None
        if min_prob is not None and scalars is None:
            from .zeroshot import read_logit_scalars

            read_logit_scalars(self._checkpoint())  # raises, saying what is missing
        thresholds = [t for t in (min_score, None if min_prob is None else prob_threshold(
            min_prob, scalars.scale, scalars.bias)) if t is not None]
        opts.threshold = max(thresholds) if thresholds else None
        opts.exact_scan = min_prob is not None
        exclude = {int(t.value) for t in terms if t.kind == "id" and t.weight > 0}
        with self.text_lock:
            vector = self.terms_vector(terms, image_vector, term_vectors)
        with self.index_lock:
            hits, more = rank_page(self.store, vector, opts, filters, exclude)
            rows = self.store.rows([h.id for h in hits])
        results = [Result(h.id, self.redact(rows[h.id]["path"]), rows[h.id]["frame"], h.score,
                          rows[h.id]["metadata"],
                          probability(h.score, scalars.scale, scalars.bias) if scalars else None,
                          h.group_count) for h in hits if h.id in rows]
        return Page(results, opts.offset, opts.offset + len(hits) if more else None,
                    expression(terms))

    def query(self, terms: list, k: int = 10, filters: Filters | None = None,
              min_score: float | None = None, image_vector=None) -> list[Result]:
        """Search with query arithmetic; indexed images given as positive #id terms are left out."""
        exclude = {int(t.value) for t in terms if t.kind == "id" and t.weight > 0}
        with self.text_lock:
            vector = self.terms_vector(terms, image_vector)
        with self.index_lock:
            return self.by_vector(vector, k, filters, min_score, exclude or None)
