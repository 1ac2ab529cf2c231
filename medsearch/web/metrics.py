"""Prometheus metrics of one web app: requests, latency, refusals, index size and uptime."""

from __future__ import annotations

import time

from ..app import Medsearch


class Metrics:
    """Prometheus metrics of one app (its own registry: several apps may share a process)."""

    def __init__(self, medsearch: Medsearch) -> None:
        from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                                       disable_created_metrics)

        disable_created_metrics()  # the *_created series only double the scrape
        self.registry = CollectorRegistry()
        self.requests = Counter("medsearch_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("medsearch_request_seconds", "Request latency", ["route"],
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.rejected = Counter("medsearch_rejected_requests", "Requests refused before routing",
                                ["reason"], registry=self.registry)
        images = Gauge("medsearch_index_vectors", "Vectors in the in-memory index",
                       registry=self.registry)
        images.set_function(lambda: medsearch.store.count)
        uptime = Gauge("medsearch_uptime_seconds", "Seconds since the app was made",
                       registry=self.registry)
        uptime.set_function(lambda: time.time() - medsearch.started)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    """A client picks any method name: metrics keep the standard ones and fold the rest."""
    return method if method in _METHODS else "other"
