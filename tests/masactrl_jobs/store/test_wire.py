"""The asyncio fast path on a real redis-server: RESP packing, batching, NOSCRIPT recovery."""

from __future__ import annotations

import asyncio
import enum
import hashlib
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.connection import Encoder, PythonRespSerializer

from masactrl_jobs.schema import JobKind
from masactrl_jobs.store import AsyncJobStore, JobStore
from masactrl_jobs.store.operation import Call
from masactrl_jobs.store.scripts import SCRIPTS
from masactrl_jobs.store.wire import AutoPipeline, pack_command
from tests.masactrl_jobs.test_store import make_input

GET_SHA = hashlib.sha1(SCRIPTS["get"].encode()).hexdigest()


class Color(str, enum.Enum):
    red = "red"


@pytest.mark.parametrize(
    "args",
    [
        ("PING",),
        ("SET", "key", "value"),
        ("EVALSHA", "abc", 2, "k1", "k2", -7, 0, 10**20),
        ("SET", "k", 1.5),
        ("SET", "k", 1e-7),
        ("SET", "k", b"\x00\xffraw"),
        ("SET", "k", "caf\u00e9 \u6f22 \r\n"),
        ("SET", "k", ""),
        ("SET", Color.red, "v"),
    ],
)
def test_packing_matches_redis_py(args: tuple[Any, ...]) -> None:
    chunks: list[bytes] = []
    pack_command(chunks, args)
    # redis-py's own pure-Python encoder is the independent reference.
    reference = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    expected = b"".join(reference.pack(*args))
    assert b"".join(chunks) == expected


def _scripts(client: redis.asyncio.Redis) -> dict[str, Any]:
    return {name: client.register_script(source) for name, source in SCRIPTS.items()}


class Recording(AutoPipeline):
    """Remembers the size of every batch that went out as one pipeline."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.batches: list[int] = []

    async def _pipeline(self, batch: list[Any], wait: bool) -> list[Any]:
        self.batches.append(len(batch))
        return await super()._pipeline(batch, wait)


def _depth_call(key: str) -> Call[list[int]]:
    return Call("depths", [key], [], lambda r: [int(n) for n in r])


def test_calls_of_one_iteration_go_out_as_one_pipeline(redis_url: str) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        await client.zadd("q:a", {"x": 1, "y": 2})
        await client.zadd("q:b", {"x": 1})
        pipeline = Recording(client, _scripts(client))
        try:
            results = await asyncio.gather(
                *(pipeline.run(_depth_call(key)) for key in ["q:a", "q:b", "q:c"] * 20)
            )
            assert results == [[2], [1], [0]] * 20
            assert pipeline.batches == [60]
            # Alone, a call takes the plain path.
            assert await pipeline.run(_depth_call("q:a")) == [2]
            assert pipeline.batches == [60]
        finally:
            await pipeline.drain()
            await client.aclose()

    asyncio.run(scenario())


def test_an_error_reply_fails_only_its_own_call(redis_url: str) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        pipeline = Recording(client, _scripts(client))
        broken = Call("rate_limit", ["bucket"], ["not a number", 1, 1], lambda r: r)
        try:
            results = await asyncio.gather(
                pipeline.run(_depth_call("q")),
                pipeline.run(broken),
                pipeline.run(_depth_call("q")),
                return_exceptions=True,
            )
            assert pipeline.batches == [3]
            assert results[0] == [0] and results[2] == [0]
            assert isinstance(results[1], redis.exceptions.ResponseError)
            # The connection is still in step: the next batch reads its own replies.
            assert (
                await asyncio.gather(*(pipeline.run(_depth_call("q")) for _ in range(3)))
                == [[0]] * 3
            )
        finally:
            await pipeline.drain()
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("concurrent", [1, 25])
def test_scripts_are_reloaded_after_redis_forgets_them(redis_url: str, concurrent: int) -> None:
    async def scenario() -> None:
        store = AsyncJobStore.from_url(redis_url)
        try:
            jobs = []
            for _ in range(concurrent):
                created = await store.create(
                    tenant="acme", kind=JobKind.synthesis, model="sd15", input=make_input()
                )
                jobs.append(created.job_id)
            await store.redis.script_flush()
            assert not any(await store.redis.script_exists(GET_SHA))
            records = await asyncio.gather(*(store.get(job) for job in jobs))
            assert [r.id for r in records if r is not None] == jobs
            assert [r.queue_position for r in records if r is not None] == list(
                range(1, concurrent + 1)
            )
            assert all(await store.redis.script_exists(GET_SHA))
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_sync_store_reloads_scripts_too(redis_url: str) -> None:
    store = JobStore.from_url(redis_url)
    try:
        job = store.create(
            tenant="acme", kind=JobKind.synthesis, model="sd15", input=make_input()
        ).job_id
        store.redis.script_flush()
        assert store.cancel(job).outcome == "canceled"
    finally:
        store.close()


def test_a_caller_that_goes_away_does_not_disturb_the_batch(redis_url: str) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
        pipeline = Recording(client, _scripts(client))
        try:
            tasks = [asyncio.ensure_future(pipeline.run(_depth_call("q"))) for _ in range(5)]
            await asyncio.sleep(0)  # queued, not yet sent
            tasks[2].cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(done[2], asyncio.CancelledError)
            assert [d for i, d in enumerate(done) if i != 2] == [[0]] * 4
            assert pipeline.batches == [5]
        finally:
            await pipeline.drain()
            await client.aclose()

    asyncio.run(scenario())
