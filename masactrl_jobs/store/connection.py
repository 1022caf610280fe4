"""Where Redis is and how the store connects to it: one server, or a Sentinel-managed master.

:class:`RedisTarget` is built from the settings (``CommonSettings.redis_target``) and makes the
store's clients; ``masactrl_jobs.queue`` builds the Celery broker from the same value, so the job
store and the broker always follow the same master.

With Sentinel, ``MASACTRL_REDIS_URL`` still says *how* to talk to the master (its database number,
user name and password, ``rediss://`` for TLS); its host and port are ignored, because the
sentinels say *where* the master is. Sentinels are reached with ``MASACTRL_REDIS_SENTINEL_PASSWORD``
when set, with no password otherwise.

Every client retries a command once on a connection or timeout error, after dropping the
connection. That is what makes a stale pooled connection harmless (Redis restarted, or a failover
moved the master: the first write on the old socket fails, the retry dials again and, with
Sentinel, asks the sentinels where the master now is); and a health check pings connections idle
longer than :data:`HEALTH_CHECK_INTERVAL_SECONDS` before reusing them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError, TimeoutError
from redis.retry import Retry

__all__ = [
    "HEALTH_CHECK_INTERVAL_SECONDS",
    "RETRIES",
    "RedisTarget",
    "ReplicaWait",
    "client_options",
]

logger = logging.getLogger(__name__)

# Once: a second failure in a row means Redis is really unreachable, and a caller waiting on it
# should get its 503 in well under a second or two, not after a long backoff.
RETRIES = 1
HEALTH_CHECK_INTERVAL_SECONDS = 10
RETRY_ON = [ConnectionError, TimeoutError]


def _sync_retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.1, base=0.01), RETRIES, supported_errors=tuple(RETRY_ON))


def _async_retry() -> redis.asyncio.retry.Retry:
    return redis.asyncio.retry.Retry(
        ExponentialBackoff(cap=0.1, base=0.01), RETRIES, supported_errors=tuple(RETRY_ON)
    )


def client_options(*, asynchronous: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """The store's connection options: decoded replies, short timeouts, one retry."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 1.0,
        "socket_timeout": 5.0,
        "health_check_interval": HEALTH_CHECK_INTERVAL_SECONDS,
        "retry": _async_retry() if asynchronous else _sync_retry(),
        "retry_on_error": list(RETRY_ON),
    }
    options.update(overrides)
    return options


@dataclass(frozen=True)
class RedisTarget:
    """One Redis server (``url``), or the master named ``sentinel_master`` of ``sentinels``."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str | None = None
    sentinel_password: str | None = None
    # Replicas that must acknowledge a critical write (``WAIT``) before the store returns; see
    # the front ends and docs/workers.md ("Redis failover").
    wait_replicas: int = 0
    wait_timeout_ms: int = 500

    @classmethod
    def of(cls, url_or_target: str | RedisTarget) -> RedisTarget:
        return url_or_target if isinstance(url_or_target, RedisTarget) else cls(url_or_target)

    @property
    def uses_sentinel(self) -> bool:
        return bool(self.sentinels)

    def master_options(self) -> dict[str, Any]:
        """Connection options from the URL that apply to the master: db, user, password, TLS."""
        parsed = dict(parse_url(self.url))  # type: ignore[no-untyped-call]
        parsed.pop("host", None)
        parsed.pop("port", None)
        if parsed.pop("connection_class", None) is SSLConnection:
            parsed["ssl"] = True
        return parsed

    def _sentinel_options(self, options: dict[str, Any]) -> dict[str, Any]:
        # The sentinels get the socket timeouts and the retry, never the master's db or password.
        sentinel = {k: v for k, v in options.items() if k.startswith("socket_") or k == "retry"}
        if self.sentinel_password:
            sentinel["password"] = self.sentinel_password
        return sentinel

    def sync_client(self, **overrides: Any) -> redis.Redis:
        """A ``redis.Redis`` on its own pool, following the master when Sentinel is used."""
        options = client_options(asynchronous=False, overrides=overrides)
        if not self.uses_sentinel:
            return redis.Redis.from_url(self.url, **options)
        manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels),
            sentinel_kwargs=self._sentinel_options(options),
            **{**self.master_options(), **options},
        )
        assert self.sentinel_master is not None  # settings refuse sentinels without a name
        client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
            self.sentinel_master, redis_class=redis.Redis
        )
        return client

    def async_client(self, **overrides: Any) -> redis.asyncio.Redis:
        """The asyncio counterpart of :meth:`sync_client`."""
        options = client_options(asynchronous=True, overrides=overrides)
        if not self.uses_sentinel:
            return redis.asyncio.Redis.from_url(self.url, **options)
        manager = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(self.sentinels),
            sentinel_kwargs=self._sentinel_options(options),
            **{**self.master_options(), **options},
        )
        assert self.sentinel_master is not None
        client: redis.asyncio.Redis = manager.master_for(
            self.sentinel_master, redis_class=redis.asyncio.Redis
        )
        return client


# After a WAIT that timed out, durable writes skip waiting for this long. Right after a failover
# the new master has no replica until the old one returns; waiting the full timeout on every
# write meanwhile would slow each job's start and end for nothing.
UNREPLICATED_BACKOFF_SECONDS = 10.0


class ReplicaWait:
    """Whether a durable write should be followed by ``WAIT``, and what the last one said.

    One per store. Not locked: a race between threads costs at most one extra or one skipped
    wait, which the back-off above tolerates by design.
    """

    def __init__(self, target: RedisTarget) -> None:
        self.replicas = target.wait_replicas
        self.timeout_ms = target.wait_timeout_ms
        self._skip_until = 0.0

    def wanted(self) -> bool:
        return self.replicas > 0 and time.monotonic() >= self._skip_until

    def command(self) -> tuple[str, int, int]:
        return ("WAIT", self.replicas, self.timeout_ms)

    def acknowledged(self, replicas: Any) -> None:
        """Record a WAIT's reply: fewer replicas than asked logs, and pauses waiting a while.

        An error reply (a node that refuses WAIT) counts as no replica: the write itself was
        answered on its own, and is not failed for what its wait could not tell.
        """
        if not isinstance(replicas, Exception) and int(replicas) >= self.replicas:
            return
        replicas = 0 if isinstance(replicas, Exception) else replicas
        self._skip_until = time.monotonic() + UNREPLICATED_BACKOFF_SECONDS
        logger.warning(
            "a job write reached %s of %s replicas within %s ms (a failover now could lose it); "
            "writes go on without waiting for %g s",
            replicas,
            self.replicas,
            self.timeout_ms,
            UNREPLICATED_BACKOFF_SECONDS,
        )
