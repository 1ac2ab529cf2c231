"""The HTTP routes: search, similar cases, export, classify, images, previews and the web page,
each a thin shell over the application object."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Query, Request
from fastapi import Path as FastPath
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from retrieval import export as cohort
from retrieval.search import Page

from ..app import Medsearch
from . import openapi
from .bodies import (ClassifyBody, ClassifyUploadFields, ExportBody, PathId, PreviewSize,
                     ResultsBody, SearchBody, SimilarBody, spec_from_search, spec_from_similar)
from .metrics import Metrics
from .openapi import ALWAYS
from .uploads import is_multipart, json_body, read_upload, upload_spec, validated

STATIC = Path(__file__).parent / "static"
#: The page's own files only: no inline script or style, no frames, no plug-ins.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
               "script-src 'self'; object-src 'none'; frame-ancestors 'none'")


def _results(found: Page) -> JSONResponse:
    """The page as is: "prob" and "group_count" appear only where they apply, which the
    response model (published for the schema) would fill with nulls."""
    return JSONResponse(found.to_json())


class DuplicateRuns:
    """The last duplicates answer per (threshold, slices) for the store as it is now: the scan
    reads every vector, so a second request for an unchanged store is served from here."""

    def __init__(self, medsearch: Medsearch) -> None:
        self.medsearch, self.lock, self.cached = medsearch, threading.Lock(), {}

    def get(self, threshold: float, slices: bool, limit: int) -> dict:
        with self.lock:  # one scan at a time: a burst of requests cannot multiply the work
            self.medsearch.refresh()
            key = (round(threshold, 6), slices, self.medsearch.store.count,
                   self.medsearch.store.db.db_max_id())
            if key not in self.cached:
                self.cached = {key: self.medsearch.duplicates(threshold, slices=slices,
                                                              limit=1000)}
            doc = dict(self.cached[key])
        doc["groups"] = doc["groups"][:limit]
        return doc


def add_routes(app: FastAPI, medsearch: Medsearch, metrics: Metrics) -> None:
    """Every route of the API and the page, answered from ``medsearch``."""
    from ..runtime import serving as serving_of

    serving = serving_of(medsearch.store, medsearch.settings)

    @app.get("/health", tags=["service"], responses=openapi.responses(403, 421))
    def health() -> dict:
        """Liveness (no token needed, no data), and what this server answers for ("serving":
        hashes of the store's identity and of the settings that shape answers), which the
        command line checks before it asks this server instead of working itself."""
        return {"status": "ok", "serving": serving}

    @app.get("/stats", tags=["service"], responses=openapi.responses(*ALWAYS, 503))
    def stats() -> dict:
        """Model, dimension, counts and index type of the store (as `medsearch info`), and
        what this server answers for ("serving", as /health)."""
        return {**medsearch.info(), "serving": serving}

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format"},
                        **openapi.responses(*ALWAYS)})
    def prometheus() -> Response:
        """Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/search", tags=["search"], response_model=ResultsBody,
              openapi_extra=openapi.json_request_body(SearchBody),
              responses=openapi.responses(*ALWAYS, 400, 404, 422, 503))
    async def search(request: Request) -> JSONResponse:
        """Text search, with query arithmetic, filters and a score threshold."""
        spec = spec_from_search(validated(SearchBody, await json_body(request)))
        return _results(await run_in_threadpool(medsearch.page, spec))

    @app.post("/similar", tags=["search"], response_model=ResultsBody,
              openapi_extra=openapi.query_body(SimilarBody),
              responses=openapi.responses(*ALWAYS, 400, 404, 415, 422, 503))
    async def similar(request: Request) -> JSONResponse:
        """Similar cases for an uploaded image (multipart ``file``) or an indexed id (JSON)."""
        if is_multipart(request):
            spec = await upload_spec(request)
        else:
            spec = spec_from_similar(validated(SimilarBody, await json_body(request)))
        return _results(await run_in_threadpool(medsearch.page, spec))

    @app.post("/export", tags=["search"], openapi_extra=openapi.query_body(ExportBody),
              response_class=Response, responses={
                  200: {"description": "The cohort's rows, one per result",
                        "content": {"text/csv": {"schema": {"type": "string"}},
                                    "application/json": {"schema": {"type": "array"}},
                                    "application/vnd.apache.parquet": {
                                        "schema": {"type": "string", "format": "binary"}}}},
                  **openapi.responses(*ALWAYS, 400, 404, 415, 422, 503)})
    async def export(request: Request,
                     format: Literal["csv", "json", "parquet"] = Query("csv")) -> Response:
        """The cohort of a query (as /search, /similar) as CSV, JSON or Parquet rows."""
        if is_multipart(request):
            spec = await upload_spec(request)
        else:
            body = validated(ExportBody, await json_body(request))
            if body.id is not None:
                spec = spec_from_similar(SimilarBody.model_construct(
                    id=body.id, query=body.query, k=body.k, filters=body.filters,
                    min_score=body.min_score, **body.shape()))
            else:
                spec = spec_from_search(SearchBody.model_construct(
                    query=body.query, terms=body.terms, k=body.k, filters=body.filters,
                    min_score=body.min_score, **body.shape()))
        found = await run_in_threadpool(medsearch.query, spec)
        rows = cohort.cohort_rows(r.to_json() for r in found)
        data = await run_in_threadpool(cohort.to_bytes, rows, format)
        return Response(data, media_type=cohort.MEDIA_TYPES[format], headers={
            "Content-Disposition": f'attachment; filename="medsearch-cohort.{format}"'})

    @app.post("/classify", tags=["search"], openapi_extra=openapi.classify_body(),
              responses=openapi.responses(*ALWAYS, 400, 404, 415, 422, 503))
    async def classify(request: Request) -> dict:
        """Zero-shot scores of an indexed image (JSON ``id``) or an upload (multipart
        ``file``): softmax across the labels and a sigmoid per label. Research use only."""
        if is_multipart(request):
            content, kind, fields = await read_upload(request)
            body = validated(ClassifyUploadFields, fields)
            labels = [body.labels] if body.labels else None
            args = (None, (content, kind), labels, body.preset, body.templates,
                    body.max_entropy, body.min_margin)
        else:
            body = validated(ClassifyBody, await json_body(request))
            args = (body.id, None, body.labels, body.preset, body.templates,
                    body.max_entropy, body.min_margin)
        return await run_in_threadpool(medsearch.classify, *args)

    duplicate_runs = DuplicateRuns(medsearch)

    @app.get("/duplicates", tags=["images"], responses=openapi.responses(*ALWAYS, 422, 503))
    async def duplicates(
            threshold: Annotated[float, Query(ge=0.9, le=1.0)] = 0.98,
            slices: bool = False,
            limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
        """Groups of near-identical stored images. One run per store version and settings is
        computed and shared, so repeated requests cost nothing."""
        return await run_in_threadpool(duplicate_runs.get, threshold, slices, limit)

    @app.get("/images/{image_id}", tags=["images"],
             responses=openapi.responses(*ALWAYS, 404, 422, 503))
    def image(image_id: Annotated[PathId, FastPath()]) -> dict:
        """Stored metadata of one indexed image."""
        return medsearch.row(image_id)

    @app.get("/images/{image_id}/preview", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/png": {"schema": {"type": "string",
                                                                   "format": "binary"}}},
                              "description": "PNG"},
                        **openapi.responses(*ALWAYS, 404, 422, 503)})
    def preview(image_id: Annotated[PathId, FastPath()],
                size: PreviewSize | None = Query(None)) -> Response:
        """PNG of the model input (padded, resized) of one indexed image."""
        return Response(medsearch.preview(image_id, size), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        """The search page; its policy admits only its own files."""
        return FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
