"""The two front ends: :class:`JobStore` (threads) and :class:`AsyncJobStore` (asyncio).

Both carry every operation of ``operations.py`` and ``worker_operations.py``; they differ only
in how a call is run: blocking on a ``redis.Redis``, or awaited on a ``redis.asyncio.Redis``
with concurrent script calls batched by :class:`~masactrl_jobs.store.wire.AutoPipeline`.

Clients come from a :class:`~masactrl_jobs.store.connection.RedisTarget` (a URL, or a
Sentinel-managed master). When the target asks for replica acknowledgements, a durable call
(``Call.durable``: enqueue, start, end, requeue) is sent with ``WAIT <replicas> <timeout>`` right
behind it on the same connection, so the store returns only once the write reached a replica or
the timeout passed. A timeout is logged and the call's result returned all the same (a store that
refused to work without its replica would turn the loss of one replica into an outage), and the
store stops waiting for a few seconds (``ReplicaWait``) rather than pay the timeout on every write
while the master has no replica.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

import redis
import redis.asyncio

from masactrl_jobs.store.connection import RedisTarget, ReplicaWait
from masactrl_jobs.store.keys import Keys
from masactrl_jobs.store.operation import AsyncRunner, Call, SyncRunner
from masactrl_jobs.store.operations import EVENTS_MAXLEN, JobOperations
from masactrl_jobs.store.render import DEFAULT_RETENTION_SECONDS
from masactrl_jobs.store.scripts import SCRIPTS
from masactrl_jobs.store.wire import AutoPipeline
from masactrl_jobs.store.worker_operations import WorkerOperations

__all__ = ["AsyncJobStore", "JobStore"]

T = TypeVar("T")


class _Store(JobOperations, WorkerOperations):
    def __init__(
        self,
        client: Any,
        *,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        prefix: str = "masactrl",
        events_maxlen: int = EVENTS_MAXLEN,
        target: RedisTarget | None = None,
        queue_policy: str = "fair",
    ) -> None:
        # The client is the store's own; callers use the operations (tests may inspect keys).
        self.redis = client
        self.keys = Keys(prefix)
        self.retention_seconds = int(retention_seconds)
        self.events_maxlen = events_maxlen
        if queue_policy not in ("fair", "fifo"):
            raise ValueError(f"queue_policy must be 'fair' or 'fifo', not {queue_policy!r}")
        self.queue_policy = queue_policy
        self.target = target or RedisTarget("")
        self.replica_wait = ReplicaWait(self.target)
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}


class JobStore(_Store, SyncRunner):
    """The job store for synchronous callers (Celery workers, janitors, tests, tools)."""

    redis: redis.Redis

    @classmethod
    def from_url(
        cls,
        url: str | RedisTarget,
        *,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        queue_policy: str = "fair",
        **redis_kwargs: Any,
    ) -> JobStore:
        """A store on its own connection pool (responses decoded, short timeouts, one retry).

        ``url`` is a Redis URL or a :class:`RedisTarget` (``settings.redis_target``: Sentinel).
        """
        target = RedisTarget.of(url)
        client = target.sync_client(**redis_kwargs)
        return cls(
            client, retention_seconds=retention_seconds, target=target, queue_policy=queue_policy
        )

    def _run(self, call: Call[T]) -> T:
        if call.script is not None:
            script = self._scripts[call.script]
            if call.durable and self.replica_wait.wanted():
                # One pipeline: WAIT counts the writes of its own connection.
                with self.redis.pipeline(transaction=False) as pipe:
                    script(keys=list(call.keys), args=list(call.args), client=pipe)
                    pipe.execute_command(*self.replica_wait.command())  # type: ignore[no-untyped-call]
                    # The script's error is the caller's; WAIT's only the log's.
                    reply, acknowledged = pipe.execute(raise_on_error=False)
                self.replica_wait.acknowledged(acknowledged)
                if isinstance(reply, Exception):
                    raise reply
                return call.parse(reply)
            return call.parse(script(keys=list(call.keys), args=list(call.args), client=self.redis))
        if not call.args:
            return call.parse(None)
        return call.parse(self.redis.execute_command(*call.args))  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.redis.close()
        # With Sentinel, the manager's own connections to the sentinels too.
        manager = getattr(self.redis.connection_pool, "sentinel_manager", None)
        if manager is not None:
            manager.close()


class AsyncJobStore(_Store, AsyncRunner):
    """The same store for asyncio callers (the gateway): every operation returns an awaitable."""

    redis: redis.asyncio.Redis

    @classmethod
    def from_url(
        cls,
        url: str | RedisTarget,
        *,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
        queue_policy: str = "fair",
        **redis_kwargs: Any,
    ) -> AsyncJobStore:
        """A store on its own connection pool (responses decoded, short timeouts, one retry).

        ``url`` is a Redis URL or a :class:`RedisTarget` (``settings.redis_target``: Sentinel).
        """
        target = RedisTarget.of(url)
        client = target.async_client(**redis_kwargs)
        return cls(
            client, retention_seconds=retention_seconds, target=target, queue_policy=queue_policy
        )

    def __init__(self, client: Any, **options: Any) -> None:
        super().__init__(client, **options)
        self._pipeline = AutoPipeline(client, self._scripts, self.replica_wait)

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
        manager = getattr(self.redis.connection_pool, "sentinel_manager", None)
        if manager is not None:
            await manager.aclose()
