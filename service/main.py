"""The gateway application: ``create_app(settings)`` (a factory for uvicorn ``--factory``)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from masactrl_jobs.catalog import load_catalog
from masactrl_jobs.queue import TaskMessages
from masactrl_jobs.schema import (
    EditCreate,
    EditParams,
    JobKind,
    SequenceCreate,
    SequenceParams,
    SynthesisCreate,
)
from masactrl_jobs.settings import load_settings
from masactrl_jobs.storage import storage_from_settings
from masactrl_jobs.store import AsyncJobStore
from service.api.contract import describe_submissions, submission_rules
from service.api.routes import ROUTERS, docs, playground
from service.api.routes.jobs import PreviewEvent, ProgressEvent, RequeuedEvent, StatusEvent
from service.config import GatewaySettings
from service.errors import install_error_handlers
from service.gateway import Gateway
from service.metrics import GatewayMetrics, MetricsMiddleware
from service.middleware import BodyLimitMiddleware, BodyLimits, encoded_image_bytes
from service.openapi import headers_without_null
from service.page_headers import PageHeadersMiddleware
from service.redaction import install_log_redaction

__all__ = ["API_VERSION", "create_app", "operation_id"]

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
DESCRIPTION = """\
MasaCtrl (mutual self-attention control) image editing and consistent synthesis for Stable
Diffusion, as asynchronous jobs. Submit an edit or a synthesis, then poll the job, wait on it with
`Prefer: wait=N`, or follow it as Server-Sent Events. Authenticate with
`Authorization: Bearer <API key>`. Every error has the body
`{"error": {"code", "message", "details"}}`.
"""


def operation_id(route: APIRoute) -> str:
    """Stable, readable operation ids from the endpoint names: create_edit -> createEdit."""
    head, *rest = route.name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _install_openapi(app: FastAPI, rules: dict[JobKind, str]) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        # The submission routes parse their bodies by hand; add the models they name.
        _, definitions = models_json_schema(
            [
                (EditCreate, "validation"),
                (EditParams, "validation"),
                (SynthesisCreate, "validation"),
                (SequenceCreate, "validation"),
                (SequenceParams, "validation"),
                (StatusEvent, "validation"),
                (ProgressEvent, "validation"),
                (PreviewEvent, "validation"),
                (RequeuedEvent, "validation"),
            ],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in definitions.get("$defs", {}).items():
            components.setdefault(name, definition)
        schema["components"]["schemas"] = dict(sorted(components.items()))
        describe_submissions(schema, rules)
        headers_without_null(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


@contextlib.contextmanager
def _startup_heap_frozen() -> Iterator[None]:
    """Leave what start-up built out of the garbage collector's passes while the app serves.

    Modules, classes, pydantic schemas, Celery's message template, the catalog: some 100,000
    objects that live as long as the process, walked again by every full collection, which a
    busy gateway triggers about once a second. Frozen, the collector looks only at what requests
    allocate: bench/gateway.py measured about 50 us less CPU per submission (see
    docs/performance-gateway.md). Start-up's few hundred garbage objects are frozen with the rest
    rather than collected first: a full collection costs 50-100 ms at every app start, and tests
    start hundreds. ``gc.freeze`` is process-wide: stopping any app unfreezes everything.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """Build the gateway; settings come from ``MASACTRL_*`` when not given."""
    settings = settings or load_settings(GatewaySettings)
    install_log_redaction()
    # Read once, here, so a bad catalog stops the gateway before it serves anything.
    catalog = load_catalog(settings)
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = AsyncJobStore.from_url(
            settings.redis_target, retention_seconds=settings.job_retention_seconds
        )
        gateway = Gateway(
            settings=settings,
            store=store,
            storage=storage_from_settings(settings),
            messages=TaskMessages(),
            catalog=catalog,
            tenants=settings.tenants_by_key_hash(),
            metrics=metrics,
        )
        app.state.gateway = gateway
        sweeper = None
        if settings.cleanup_interval_seconds > 0:
            sweeper = asyncio.create_task(gateway.run_sweeper(), name="retention-sweeper")
        try:
            with _startup_heap_frozen():
                yield
        finally:
            if sweeper is not None:
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
            await store.close()

    app = FastAPI(
        title="MasaCtrl API",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        # One schema per model: request and response shapes of shared models are identical here.
        separate_input_output_schemas=False,
        # Served by service.api.routes.docs: assets from the gateway, optionally behind a token.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # Prometheus (/metrics) is this service's telemetry; skip FastAPI's OpenTelemetry hooks.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    for router in ROUTERS:
        app.include_router(router)
    app.mount(docs.ASSETS_PATH, docs.assets(), name="docs-assets")
    app.mount(playground.ASSETS_PATH, playground.assets(), name="playground-assets")
    install_error_handlers(app)
    app.add_middleware(PageHeadersMiddleware)
    limits = BodyLimits(
        small=settings.max_json_bytes,
        image=encoded_image_bytes(settings.max_image_bytes),
        raw_image=settings.max_image_bytes,
        raw_video=settings.max_video_bytes,
        ceiling=settings.max_request_bytes,
        max_large_uploads=settings.max_concurrent_large_uploads,
        slot_wait_seconds=settings.large_upload_wait_seconds,
    )
    app.add_middleware(BodyLimitMiddleware, limits=limits)
    # Added last, so it is outermost and also times and counts 413s and errors.
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    # The submission routes' rules in words, with this catalog's models and these limits:
    # written now, once, and added to the document when it is first generated.
    _install_openapi(app, submission_rules(catalog, settings))
    return app
