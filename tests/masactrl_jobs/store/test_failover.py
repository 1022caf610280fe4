"""The store across Redis outages, on real processes: a restarted server (stale pooled
connections) and a Sentinel failover (1 primary, 1 replica, 3 sentinels; the primary SIGKILLed
with jobs queued and one running under a lease)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from masactrl_jobs.schema import ControlInput, JobInput, JobKind, JobStatus
from masactrl_jobs.settings import CommonSettings, load_settings
from masactrl_jobs.store import AsyncJobStore, JobStore, connection
from masactrl_jobs.store.connection import RedisTarget
from tests.conftest import RedisServer, free_port
from tests.sentinel_cluster import SentinelCluster

MESSAGE = ("masactrl.sd15", '{"body": "run it"}')
JOB_INPUT = JobInput(
    source_prompt="a cat",
    target_prompts=["a dog"],
    seed=1,
    steps=10,
    guidance_scale=7.5,
    width=512,
    height=512,
    control=ControlInput(start_step=4, start_layer=10),
)
# Sentinel needs 1 s to call the primary down, then a vote and a promotion; clients must follow
# within a few seconds of that.
FOLLOW_WITHIN_SECONDS = 15.0


def create(store: JobStore) -> str:
    result = store.create(
        tenant="acme", kind=JobKind.synthesis, model="sd15", input=JOB_INPUT, message=MESSAGE
    )
    assert result.job_id is not None
    return result.job_id


# --- stale connections ----------------------------------------------------------------------


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone: it is restarted under the clients' feet."""
    server = RedisServer(port=free_port(), data_dir=tmp_path)
    server.start()
    yield server
    server.stop()


def test_no_request_fails_after_redis_restarted(private_redis: RedisServer) -> None:
    store = JobStore.from_url(private_redis.url)
    async_store = AsyncJobStore.from_url(private_redis.url)
    loop = asyncio.new_event_loop()
    try:
        jobs = [create(store) for _ in range(5)]

        async def read_all() -> list[object]:
            # Concurrent reads: several pooled connections, batched by the pipeline.
            return await asyncio.gather(*(async_store.get(job) for job in jobs))

        assert all(loop.run_until_complete(read_all()))
        private_redis.restart()  # every pooled connection is now stale
        for _ in range(30):
            assert store.get(jobs[0]) is not None
            assert all(loop.run_until_complete(read_all()))
        assert create(store)
    finally:
        store.close()
        loop.run_until_complete(async_store.close())
        loop.close()


# --- Sentinel failover ------------------------------------------------------------------------


def sentinel_target(cluster: SentinelCluster) -> RedisTarget:
    settings = load_settings(CommonSettings, _env_file=None, environment="development")
    return settings.redis_target


def wait_until_answers(ping: object, timeout: float) -> float:
    """Seconds until ``ping()`` succeeds (errors while the master is away are expected)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if ping():  # type: ignore[operator]
                return time.monotonic() - started
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(f"the store did not reach the new master within {timeout} s")


# With a password, every node and sentinel requires it (as in the compose `ha` profile).
@pytest.mark.parametrize("sentinel_cluster", [None, "a-redis-password"], indirect=True)
def test_a_failover_loses_no_job_and_keeps_leases_and_fencing(
    sentinel_cluster: SentinelCluster,
) -> None:
    cluster = sentinel_cluster
    target = sentinel_target(cluster)
    assert target.wait_replicas == 1
    store = JobStore.from_url(target, retention_seconds=3600)
    async_store = AsyncJobStore.from_url(target, retention_seconds=3600)
    loop = asyncio.new_event_loop()
    try:
        queued = [create(store) for _ in range(5)]
        running = create(store)
        assert store.acquire_lease(running, "w1", ttl=60)
        assert store.start(running, "w1").attempts == 1
        assert loop.run_until_complete(async_store.get(running)) is not None

        old_master = cluster.kill_master()
        killed_at = time.monotonic()
        new_master = cluster.wait_for_failover(old_master)
        assert new_master != old_master
        sync_after = wait_until_answers(store.ping, FOLLOW_WITHIN_SECONDS)
        async_after = wait_until_answers(
            lambda: loop.run_until_complete(async_store.ping()), FOLLOW_WITHIN_SECONDS
        )
        print(f"clients followed {time.monotonic() - killed_at:.1f} s after the kill")
        assert sync_after < FOLLOW_WITHIN_SECONDS and async_after < FOLLOW_WITHIN_SECONDS

        # Nothing acknowledged before the kill is lost: every job, every queue message.
        for job in queued:
            record = store.get(job)
            assert record is not None and record.status is JobStatus.queued
        assert store.redis.llen(MESSAGE[0]) == len(queued) + 1
        record = loop.run_until_complete(async_store.get(running))
        assert record is not None and record.status is JobStatus.running

        # The lease survived: the holder renews it, nobody else takes it.
        assert store.renew_lease(running, "w1", ttl=60, attempt=1)
        assert not store.acquire_lease(running, "w2", ttl=60)
        # Fencing holds: a later attempt supersedes the first, which can no longer end the job.
        assert store.start(running, "w2").attempts == 2
        assert store.succeed(running, [], attempt=1).outcome == "fenced"
        assert store.succeed(running, [], attempt=2).ok
        assert not store.succeed(running, [], attempt=2).ok

        # Every job ends exactly once, on the new master, through both front ends.
        for job in queued:
            attempt = store.start(job, "w3").attempts
            result = loop.run_until_complete(async_store.succeed(job, [], attempt=attempt))
            assert result.ok
        for job in [*queued, running]:
            terminal = [e for e in store.read_events(job, count=1000) if e.is_terminal]
            assert len(terminal) == 1, job
    finally:
        store.close()
        loop.run_until_complete(async_store.close())
        loop.close()


@pytest.mark.parametrize("backoff", [0.0, 60.0])
def test_a_durable_write_no_replica_acknowledges_is_done_and_logged(
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    backoff: float,
) -> None:
    # A lone server has no replica: WAIT times out, the store goes on (and says so), then stops
    # waiting for the back-off.
    monkeypatch.setattr(connection, "UNREPLICATED_BACKOFF_SECONDS", backoff)
    target = RedisTarget(redis_url, wait_replicas=1, wait_timeout_ms=20)
    store = JobStore.from_url(target)
    try:
        # Load the scripts first: a NOSCRIPT reply makes a batch go out (and wait) again.
        warm = JobStore.from_url(redis_url)
        job = create(warm)
        warm.start(job, "w0")
        warm.fail(job, "internal_error", "warm-up", attempt=1)
        warm.close()
        with caplog.at_level("WARNING", logger="masactrl_jobs.store.connection"):
            job = create(store)

            async def start_and_fail() -> None:
                async_store = AsyncJobStore.from_url(target)
                record = await async_store.get(job)
                assert record is not None and record.status is JobStatus.queued
                # Run alone and batched: both paths wait.
                assert (await async_store.start(job, "w1")).attempts == 1
                results = await asyncio.gather(
                    async_store.fail(job, "internal_error", "boom", attempt=1),
                    async_store.get(job),
                )
                assert results[0].ok
                await async_store.close()

            asyncio.run(start_and_fail())
        warnings = [r for r in caplog.records if "reached 0 of 1 replicas" in r.getMessage()]
        # create, start (alone), fail (batched); the reads do not wait. With a back-off, the sync
        # store's first timeout pauses its own waits only: the async store waits once too.
        assert len(warnings) == (3 if backoff == 0 else 2)
    finally:
        store.close()


def test_a_wait_that_errors_counts_as_no_replica(caplog: pytest.LogCaptureFixture) -> None:
    replica_wait = connection.ReplicaWait(RedisTarget("redis://x", wait_replicas=1))
    assert replica_wait.wanted()
    replica_wait.acknowledged(1)
    assert replica_wait.wanted() and not caplog.records
    with caplog.at_level("WARNING", logger="masactrl_jobs.store.connection"):
        replica_wait.acknowledged(redis.exceptions.ResponseError("WAIT cannot be used here"))
    assert "reached 0 of 1 replicas" in caplog.text
    assert not replica_wait.wanted()  # paused for the back-off
