"""Prometheus metrics: HTTP requests by route and status, latencies, submissions, queue depth,
queued jobs by tenant and priority, and expirations.

Each app has its own registry, so several apps in one process (tests) never collide, and the
middleware is plain ASGI (no per-request task or body buffering).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["GatewayMetrics", "MetricsMiddleware"]

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Submissions take a few ms; SSE and Prefer: wait hold connections for up to a minute.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    """The gateway's metric families, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "masactrl_http_requests",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "masactrl_http_request_duration_seconds",
            "HTTP request latency by route template and method (until the response ends).",
            ["route", "method"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.jobs_submitted = Counter(
            "masactrl_jobs_submitted",
            "Jobs accepted for processing, by kind and model.",
            ["kind", "model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "masactrl_queue_depth",
            "Jobs waiting in each model's queue (sampled when scraped).",
            ["model"],
            registry=self.registry,
        )
        self.queued = Gauge(
            "masactrl_queued_jobs",
            "Queued jobs by model, tenant and priority (sampled when scraped).",
            ["model", "tenant", "priority"],
            registry=self.registry,
        )
        self.expired = Gauge(
            "masactrl_jobs_expired",
            "Jobs that reached their deadline unstarted, by model: a count kept in Redis since "
            "the queue began, sampled when scraped (use it as a counter).",
            ["model"],
            registry=self.registry,
        )
        self._submitted: dict[tuple[str, str], Any] = {}

    def submitted(self, kind: str, model: str) -> None:
        """Count one accepted job (the labelled child is looked up once per kind and model)."""
        child = self._submitted.get((kind, model))
        if child is None:
            child = self._submitted[kind, model] = self.jobs_submitted.labels(kind, model)
        child.inc()


class MetricsMiddleware:
    """Counts and times every HTTP request under its route template (never the raw path)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics
        # Labelled children by (route, method, status): labels() takes a lock and builds a key
        # on every call, which shows on the submission hot path.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.metrics.requests.labels(route, method, str(status)),
                self.metrics.latency.labels(route, method),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # Unmatched paths share one label so scanners cannot explode the series count.
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            if method not in _METHODS:
                method = "other"  # arbitrary client-chosen tokens must not become series
            self._observe(template, method, status, time.perf_counter() - started)
