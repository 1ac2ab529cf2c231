"""The /cohorts routes: save the current results as a cohort, list, show, add to, refresh,
diff, export and delete cohorts, each a thin shell over medsearch.cohorts."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI, Query, Request
from fastapi import Path as FastPath
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from retrieval import export

from ..app import Medsearch
from ..cohorts import MAX_MEMBERS, Cohorts
from . import openapi
from .bodies import (ImageId, SearchBody, SimilarBody, _choice, _NoNulls, spec_from_search,
                     spec_from_similar)
from .openapi import ALWAYS
from .uploads import json_body, validated

Name = Annotated[str, FastPath(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class CohortBody(_NoNulls):
    """A new cohort: exactly one of a search, a similar-cases query or a list of ids."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_choice("search", "similar", "ids"))
    _NOT_NULL = ("search", "similar", "ids")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    search: SearchBody | None = None
    similar: SimilarBody | None = None
    ids: list[ImageId] | None = Field(None, min_length=1, max_length=MAX_MEMBERS)
    replace: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if sum(x is not None for x in (self.search, self.similar, self.ids)) != 1:
            raise ValueError("give exactly one of search, similar or ids")
        return self


class CohortIdsBody(BaseModel, extra="forbid"):
    ids: list[ImageId] = Field(min_length=1, max_length=10_000)


def add_cohort_routes(app: FastAPI, medsearch: Medsearch) -> None:
    cohorts = Cohorts(medsearch)
    codes = openapi.responses(*ALWAYS, 400, 404, 422, 503)

    @app.post("/cohorts", tags=["cohorts"], status_code=201,
              openapi_extra=openapi.json_request_body(CohortBody),
              responses=openapi.responses(*ALWAYS, 400, 404, 409, 422, 503))
    async def save(request: Request) -> dict:
        """Save a query's results (or ids) as a cohort, with its provenance."""
        body = validated(CohortBody, await json_body(request))
        if body.ids is not None:
            return await run_in_threadpool(cohorts.save, body.name, ids=list(body.ids),
                                           replace=body.replace)
        spec = spec_from_search(body.search) if body.search else spec_from_similar(body.similar)
        return await run_in_threadpool(cohorts.save, body.name, spec=spec, replace=body.replace)

    @app.get("/cohorts", tags=["cohorts"], responses=openapi.responses(*ALWAYS, 503))
    def names() -> dict:
        """The saved cohorts."""
        return {"cohorts": cohorts.list()}

    @app.get("/cohorts/{name}", tags=["cohorts"], responses=codes)
    def show(name: Name) -> dict:
        """A cohort's ids and provenance."""
        return cohorts.show(name)

    @app.post("/cohorts/{name}/add", tags=["cohorts"],
              openapi_extra=openapi.json_request_body(CohortIdsBody), responses=codes)
    async def add(name: Name, request: Request) -> dict:
        """Add images (a cohort of ids is made when the name is new)."""
        body = validated(CohortIdsBody, await json_body(request))
        return await run_in_threadpool(cohorts.add, name, list(body.ids))

    @app.post("/cohorts/{name}/refresh", tags=["cohorts"], responses=codes)
    async def refresh(name: Name) -> dict:
        """Re-run the saved query and save its answer: what entered and what left."""
        return await run_in_threadpool(cohorts.refresh, name)

    @app.get("/cohorts/{name}/diff", tags=["cohorts"], responses=codes)
    async def diff(name: Name) -> dict:
        """What a refresh would change, without saving."""
        return await run_in_threadpool(cohorts.diff, name)

    @app.get("/cohorts/{name}/export", tags=["cohorts"], response_class=Response, responses=codes)
    def download(name: Name, format: Literal["csv", "json", "parquet"] = Query("csv")) -> Response:
        """The cohort's rows in saved order (its provenance: GET /cohorts/{name})."""
        data = export.to_bytes(cohorts.rows(name), format)
        return Response(data, media_type=export.MEDIA_TYPES[format], headers={
            "Content-Disposition": f'attachment; filename="{name}.{format}"'})

    @app.delete("/cohorts/{name}", tags=["cohorts"], status_code=204, response_class=Response,
                responses=codes)
    def remove(name: Name) -> Response:
        """Delete a cohort (its images stay indexed)."""
        cohorts.delete(name)
        return Response(status_code=204)
