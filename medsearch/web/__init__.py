"""The web app (HTTP API and page) over one application object; ``create_app`` assembles it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from ..app import Medsearch
from .bodies import (ClassifyBody, ErrorBody, ExportBody, FiltersBody, SearchBody, SimilarBody,
                     TermBody)
from .errors import install_error_handlers
from .guard import Guard, HostPolicy
from .metrics import Metrics
from .openapi import document_bodies
from .cohorts import CohortBody, CohortIdsBody, add_cohort_routes
from .routes import add_routes

DEFAULT_MAX_UPLOAD = 64 * 1024 * 1024


def create_app(medsearch: Medsearch, *, token: str | None = None,
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """Load both towers once, follow the store's changes, and build the app over ``medsearch``.

    ``token`` is stripped of surrounding white space and may not be blank; ``allowed_hosts``
    are the Host names served (default: the loopback names), see :class:`HostPolicy`.
    """
    if token is not None:
        token = token.strip()
        if not token:
            raise ValueError("the token is blank; give a real one or none")
    hosts = HostPolicy(allowed_hosts)
    medsearch.load_models()  # errors show at start-up, not at the first request
    medsearch.watch_store()
    metrics = Metrics(medsearch)

    # FastAPIOffline: /docs serves Swagger UI from the package, not a CDN (hospitals are offline)
    app = FastAPIOffline(title="medsearch", version="0.1.0",
                         description="Search medical images by text, image or indexed id. "
                                     "For research use only; not for diagnosis.")
    app.state.medsearch = medsearch
    app.add_middleware(Guard, token=token, max_body=max_upload_bytes, metrics=metrics, hosts=hosts)
    install_error_handlers(app)
    add_routes(app, medsearch, metrics)
    add_cohort_routes(app, medsearch)
    document_bodies(app, [SearchBody, SimilarBody, ExportBody, ClassifyBody, FiltersBody,
                          TermBody, ErrorBody, CohortBody, CohortIdsBody], secured=bool(token))
    return app


__all__ = ["DEFAULT_MAX_UPLOAD", "create_app"]
