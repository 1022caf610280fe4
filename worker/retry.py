"""Retries with backoff for the calls a worker makes to storage and Redis.

A blip (S3 answering 503, Redis restarting behind its AOF) must not fail a job that took minutes
of GPU time, so such calls are retried with exponential backoff and jitter; a failure that
outlasts the retries surfaces as the original exception, which the runner classifies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import redis
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from masactrl_jobs.storage import StorageUnavailable

__all__ = ["TRANSIENT_ERRORS", "Retrier"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors worth another try. ObjectNotFound, InvalidKey and other StorageErrors are not: they will
# be the same next time.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    StorageUnavailable,
    redis.ConnectionError,
    redis.TimeoutError,
    redis.ReadOnlyError,
    # A full Redis (maxmemory with noeviction) frees up as retention expires old jobs.
    redis.exceptions.OutOfMemoryError,
)


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    name = getattr(state.fn, "__qualname__", repr(state.fn))
    sleep = state.next_action.sleep if state.next_action else 0.0
    logger.warning(
        "%s failed (attempt %d): %s; retrying in %.1f s", name, state.attempt_number, error, sleep
    )


class Retrier:
    """Calls a function, retrying :data:`TRANSIENT_ERRORS` with exponential backoff and jitter.

    It gives up after ``attempts`` tries, or, with ``for_seconds``, once that long has passed
    (a Redis restart lasts as long as it lasts, not a number of tries).
    """

    def __init__(
        self,
        attempts: int = 5,
        max_wait: float = 4.0,
        initial_wait: float = 0.1,
        *,
        for_seconds: float | None = None,
    ) -> None:
        self.attempts = attempts
        self.max_wait = max_wait
        self.initial_wait = initial_wait
        self.for_seconds = for_seconds

    def __call__(self, fn: Callable[..., T], /, *args: object, **kwargs: object) -> T:
        """``fn(*args, **kwargs)``, retried; the last error is re-raised unchanged."""
        retrying = Retrying(
            retry=retry_if_exception_type(TRANSIENT_ERRORS),
            stop=(
                stop_after_attempt(self.attempts)
                if self.for_seconds is None
                else stop_after_delay(self.for_seconds)
            ),
            wait=wait_exponential_jitter(initial=self.initial_wait, max=self.max_wait),
            before_sleep=_log_retry,
            reraise=True,
        )
        return retrying(fn, *args, **kwargs)
