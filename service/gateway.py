"""The gateway's long-lived parts (store, storage, broker, catalog, tenants) and job helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fastapi import Response
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool

from masactrl_jobs.catalog import Catalog, ModelEntry
from masactrl_jobs.queue import TaskMessages
from masactrl_jobs.schema import JobPublic, JobStatus
from masactrl_jobs.shape import ModelShape
from masactrl_jobs.storage import Storage, results_prefix
from masactrl_jobs.store import AsyncJobStore, JobRecord
from service.config import GatewaySettings, Tenant
from service.errors import ApiError, shown_id
from service.intake import ImageIntake
from service.metrics import GatewayMetrics

__all__ = ["Gateway"]

logger = logging.getLogger(__name__)

# Blocking reads stay well below the store's socket timeout (5 s), so a slow stream is never
# mistaken for a dead Redis.
_BLOCK_MS = 1000
# How long a model's reported shape is reused before asking Redis again: a shape changes only
# when its workers are replaced by ones serving another checkpoint.
_SHAPE_REFRESH_SECONDS = 2.0

_DATETIME = TypeAdapter(datetime)
# A JSON string literal, non-ASCII kept as is and control characters escaped as pydantic does.
_json_string = json.encoder.encode_basestring


@dataclass
class Gateway:
    """Everything a request handler needs, built once per app."""

    settings: GatewaySettings
    store: AsyncJobStore
    storage: Storage
    messages: TaskMessages
    catalog: Catalog
    tenants: dict[str, Tenant]
    metrics: GatewayMetrics
    intake: ImageIntake = field(init=False)
    _url_base: str = field(init=False, repr=False)
    # Open streams and held waits per (what, tenant), in this process.
    _held: Counter[tuple[str, str]] = field(init=False, repr=False, default_factory=Counter)
    # Catalog entries with their workers' measured shapes, by name, with when to ask again.
    _entries: dict[str, tuple[float, ModelEntry]] = field(
        init=False, repr=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self.intake = ImageIntake(self.settings, self.storage)
        # The jobs' URL prefix as JSON string content (the quotes left off), for created_body.
        base = self.settings.public_base_url.rstrip("/")
        self._url_base = _json_string(f"{base}/v1/jobs/")[1:-1]

    # -- rendering
    def render(self, record: JobRecord) -> JobPublic:
        """The public job object, with presigned output URLs (and short-lived preview URLs)."""
        return record.to_public(
            base_url=self.settings.public_base_url,
            url_for=self.storage.url,
            url_ttl_seconds=self.settings.presigned_url_ttl_seconds,
            retention_seconds=self.settings.job_retention_seconds,
            preview_url_for=self.preview_url,
        )

    def preview_url(self, key: str) -> str:
        """A live preview's URL: signed like the outputs', but living only a few minutes."""
        return self.storage.url(key, expires_in=self.settings.preview_url_ttl_seconds)

    def job_response(
        self, record: JobRecord, status_code: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        """A JSON response holding the job object."""
        body = self.created_body(record) or self.render(record).model_dump_json()
        return Response(body, status_code, headers=headers, media_type="application/json")

    def created_body(self, record: JobRecord) -> bytes | None:
        """The job object of a job that is queued and untouched since it was created, as the
        bytes ``render(record).model_dump_json()`` gives, written out directly; None for any
        other job. Submissions answer with such a job, and rendering it through the pydantic
        models costs more CPU than the rest of building the response.
        """
        if (
            record.status is not JobStatus.queued
            or record.webhook is not None
            or record.started_at is not None
            or record.completed_at is not None
            or record.progress
            or record.preview is not None
            or record.output is not None
            or record.error
            or record.metrics
            or record.warnings
            or record.deadline_at is not None
            or record.retry_of
            or record.retried_by
        ):
            return None
        created = _DATETIME.dump_json(datetime.fromtimestamp(record.created_at, tz=timezone.utc))
        job_id = _json_string(record.id)
        url = f"{self._url_base}{job_id[1:-1]}"
        position = "null" if record.queue_position is None else int(record.queue_position)
        return (
            f'{{"id":{job_id},"kind":{_json_string(record.kind.value)},'
            f'"status":"queued","created_at":{created.decode()},"started_at":null,'
            f'"completed_at":null,"model":{_json_string(record.model)},'
            f'"input":{record.input_json or record.input.model_dump_json()},'
            f'"queue_position":{position},"priority":{int(record.priority)},'
            f'"start_by":null,"retry_of":null,"retried_by":null,'
            f'"progress":null,"preview":null,"output":null,"error":null,"metrics":null,'
            f'"attempts":{int(record.attempts)},"webhook":null,"warnings":[],'
            f'"urls":{{"self":"{url}","cancel":"{url}/cancel","events":"{url}/events",'
            f'"retry":"{url}/retry"}}}}'
        ).encode()

    async def owned_job(self, tenant: Tenant, job_id: str) -> JobRecord:
        """The tenant's job; 404 when it does not exist *or belongs to someone else*."""
        record = await self.store.get(job_id) if len(job_id) <= 64 else None
        if record is None or record.tenant != tenant.name:
            # Never 403: that would confirm to another tenant that the id exists.
            raise ApiError(404, "not_found", f"No job with id {shown_id(job_id)}.")
        return record

    # -- models
    async def model_entry(self, name: str | None = None) -> ModelEntry:
        """The catalog entry ``name`` (or the default) as its live workers measured the model,
        or as the catalog declares it until one has reported; ``UnknownModel`` if absent."""
        entry = self.catalog.get(name)
        cached = self._entries.get(entry.name)
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        return (await self._measured([entry]))[0]

    async def model_entries(self) -> list[ModelEntry]:
        """Every catalog entry, each as :meth:`model_entry` gives it (one round trip)."""
        return await self._measured(self.catalog.models)

    async def _measured(self, entries: list[ModelEntry]) -> list[ModelEntry]:
        shapes = await self.store.model_shapes([entry.name for entry in entries])
        refresh_at = time.monotonic() + _SHAPE_REFRESH_SECONDS
        measured = []
        for entry in entries:
            if (reported := shapes.get(entry.name)) is not None:
                try:
                    entry = entry.with_shape(ModelShape.model_validate_json(reported))
                except ValidationError as exc:
                    logger.warning("ignoring the shape reported for %s: %s", entry.name, exc)
            self._entries[entry.name] = (refresh_at, entry)
            measured.append(entry)
        return measured

    # -- held connections
    @contextlib.contextmanager
    def hold(self, what: str, tenant: Tenant) -> Iterator[None]:
        """Count one open stream (``what="stream"``) or held wait (``"wait"``) of the tenant for
        as long as the block runs; 429 past the tenant's cap.

        Each one holds a connection and a Redis poll loop, so one tenant must not take them all.
        The count is per gateway process: the cap in force is it times the replicas.
        """
        cap = (
            self.settings.max_streams_per_tenant
            if what == "stream"
            else self.settings.max_waits_per_tenant
        )
        key = (what, tenant.name)
        if self._held[key] >= cap:
            noun = "event streams" if what == "stream" else "requests waiting with Prefer: wait"
            raise ApiError(
                429,
                "too_many_open",
                f"This key already has {cap} open {noun}; close one or retry later.",
                headers={"Retry-After": "5"},
            )
        self._held[key] += 1
        try:
            yield
        finally:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]

    # -- waiting
    async def wait_until_done(self, job_id: str, seconds: float) -> JobRecord | None:
        """Hold until the job ends or ``seconds`` pass (Prefer: wait), then return it."""
        deadline = time.monotonic() + seconds
        after = "0"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            block = max(1, min(_BLOCK_MS, int(remaining * 1000)))
            events = await self.store.wait_events(job_id, after=after, block_ms=block)
            if events:
                after = events[-1].id
                if any(e.is_terminal for e in events):
                    break
            elif (record := await self.store.get(job_id)) is None or record.status.is_terminal():
                # No new event and already terminal: the stream was trimmed or expired.
                return record
        return await self.store.get(job_id)

    # -- retention
    async def sweep_expired(self, limit: int = 100) -> tuple[int, int]:
        """Delete jobs and inputs past retention: results first, then the Redis records."""
        job_ids = await self.store.expired_jobs(limit=limit)
        purged = []
        for job_id in job_ids:
            try:
                await run_in_threadpool(self.storage.delete_prefix, results_prefix(job_id))
            except Exception as exc:
                # Keep the record so the next sweep retries; never orphan stored results.
                logger.warning("could not delete results of job %s: %s", job_id, exc)
                continue
            purged.append(job_id)
        await self.store.purge_jobs(purged)
        inputs = await self.store.forget_inputs(await self.store.expired_inputs(limit=limit))
        for key in inputs:
            try:
                await run_in_threadpool(self.storage.delete, key)
            except Exception as exc:
                logger.warning("could not delete input %s: %s", key, exc)
        return len(purged), len(inputs)

    async def run_sweeper(self) -> None:
        """Sweep every ``cleanup_interval_seconds`` until cancelled."""
        interval = self.settings.cleanup_interval_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                while sum(await self.sweep_expired()) > 0:
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("retention sweep failed: %s", exc)
