"""The two front ends: :class:`JobStore` (threads) and :class:`AsyncJobStore` (asyncio).

Both carry every operation of ``operations.py`` and ``worker_operations.py``; they differ only
in how a call is run: blocking on a ``redis.Redis``, or awaited on a ``redis.asyncio.Redis``
with concurrent script calls batched by :class:`~masactrl_jobs.store.wire.AutoPipeline`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from masactrl_jobs.store.keys import Keys
from masactrl_jobs.store.operation import AsyncRunner, Call, SyncRunner
from masactrl_jobs.store.operations import EVENTS_MAXLEN, JobOperations
from masactrl_jobs.store.render import DEFAULT_RETENTION_SECONDS
from masactrl_jobs.store.scripts import SCRIPTS
from masactrl_jobs.store.wire import AutoPipeline
from masactrl_jobs.store.worker_operations import WorkerOperations

__all__ = ["AsyncJobStore", "JobStore"]

T = TypeVar("T")


def _client_options(overrides: dict[str, Any]) -> dict[str, Any]:
    # Fail fast: a caller waiting on an unreachable Redis should get a 503 in well under a second
    # or two, not after redis-py's default retries with backoff.
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 1.0,
        "socket_timeout": 5.0,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
    }
    options.update(overrides)
    return options


class _Store(JobOperations, WorkerOperations):
    def __init__(
        self,
        client: Any,
        *,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        prefix: str = "masactrl",
        events_maxlen: int = EVENTS_MAXLEN,
    ) -> None:
        # The client is the store's own; callers use the operations (tests may inspect keys).
        self.redis = client
        self.keys = Keys(prefix)
        self.retention_seconds = int(retention_seconds)
        self.events_maxlen = events_maxlen
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}


class JobStore(_Store, SyncRunner):
    """The job store for synchronous callers (Celery workers, janitors, tests, tools)."""

    redis: redis.Redis

    @classmethod
    def from_url(
        cls, url: str, *, retention_seconds: int = DEFAULT_RETENTION_SECONDS, **redis_kwargs: Any
    ) -> JobStore:
        """A store on its own connection pool (responses decoded, short timeouts)."""
        client = redis.Redis.from_url(url, **_client_options(redis_kwargs))
        return cls(client, retention_seconds=retention_seconds)

    def _run(self, call: Call[T]) -> T:
        if call.script is not None:
            script = self._scripts[call.script]
            return call.parse(script(keys=list(call.keys), args=list(call.args), client=self.redis))
        if not call.args:
            return call.parse(None)
        return call.parse(self.redis.execute_command(*call.args))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.redis.close()


class AsyncJobStore(_Store, AsyncRunner):
    """The same store for asyncio callers (the gateway): every operation returns an awaitable."""

    redis: redis.asyncio.Redis

    @classmethod
    def from_url(
        cls, url: str, *, retention_seconds: int = DEFAULT_RETENTION_SECONDS, **redis_kwargs: Any
    ) -> AsyncJobStore:
        """A store on its own connection pool (responses decoded, short timeouts)."""
        client = redis.asyncio.Redis.from_url(url, **_client_options(redis_kwargs))
        return cls(client, retention_seconds=retention_seconds)

    def __init__(self, client: Any, **options: Any) -> None:
        super().__init__(client, **options)
        self._pipeline = AutoPipeline(client, self._scripts)

    def _run(self, call: Call[T]) -> Awaitable[T]:
        return self._run_async(call)

    async def _run_async(self, call: Call[T]) -> T:
        if call.script is not None:
            return await self._pipeline.run(call)
        if not call.args:
            return call.parse(None)
        reply = await self.redis.execute_command(*call.args)  # type: ignore[no-untyped-call]
        return call.parse(reply)

    async def close(self) -> None:
        await self._pipeline.drain()
        await self.redis.aclose()
