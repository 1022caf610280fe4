"""Fencing and recovery on a real redis-server: who may end a job, who may keep its lease, and how
a job whose worker is gone goes back in its queue."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from masactrl_jobs.ids import new_id
from masactrl_jobs.schema import ControlInput, JobInput, JobKind, JobStatus
from masactrl_jobs.store import JobStore

MESSAGE = ("masactrl.sd15", '{"body": "run it"}')


@pytest.fixture()
def store(redis_url: str) -> Iterator[JobStore]:
    s = JobStore.from_url(redis_url, retention_seconds=3600)
    yield s
    s.close()


def create(store: JobStore, message: Callable[[str], tuple[str, str]] | None = None) -> str:
    """A queued sd15 job; ``message(job_id)`` is its broker message, when given."""
    job_id = new_id()
    job_input = JobInput(
        source_prompt="a cat",
        target_prompts=["a dog"],
        seed=1,
        steps=10,
        guidance_scale=7.5,
        width=512,
        height=512,
        control=ControlInput(start_step=4, start_layer=10),
    )
    result = store.create(
        tenant="acme",
        kind=JobKind.synthesis,
        model="sd15",
        input=job_input,
        job_id=job_id,
        message=message(job_id) if message else None,
    )
    assert result.job_id == job_id
    return job_id


def superseded_job(store: JobStore) -> str:
    """A job whose first attempt stalled past its lease while a second attempt started."""
    job = create(store)
    assert store.start(job, "stalled").attempts == 1
    assert store.start(job, "second").attempts == 2
    return job


def test_only_the_latest_attempt_may_succeed(store: JobStore) -> None:
    job = superseded_job(store)
    stale = store.succeed(job, [], {"attempt": 1}, attempt=1)
    assert (stale.outcome, stale.previous) == ("fenced", "running")
    record = store.get(job)
    assert record is not None and record.status is JobStatus.running and record.output is None
    assert store.succeed(job, [], {"attempt": 2}, attempt=2).ok
    assert [e.event for e in store.read_events(job)][-1] == "succeeded"


@pytest.mark.parametrize("end", ["fail", "cancel"])
def test_a_superseded_attempt_can_neither_fail_nor_cancel_the_job(
    store: JobStore, end: str
) -> None:
    job = superseded_job(store)
    if end == "fail":
        result = store.fail(job, "internal_error", "stale worker", attempt=1)
    else:
        store.cancel(job)
        result = store.finish_canceled(job, attempt=1)
    assert result.outcome == "fenced"
    record = store.get(job)
    assert record is not None and record.status is JobStatus.running


def test_a_lapsed_lease_is_taken_back_only_by_the_attempt_still_running(store: JobStore) -> None:
    job = create(store)
    assert store.acquire_lease(job, "w1", ttl=0.05)
    assert store.start(job, "w1").attempts == 1
    time.sleep(0.1)  # lapsed, as during a Redis restart
    assert store.redis.get(store.keys.lease(job)) is None
    assert not store.renew_lease(job, "w2", ttl=5, attempt=1)  # not its run
    assert store.renew_lease(job, "w1", ttl=5, attempt=1)
    assert store.redis.get(store.keys.lease(job)) == "w1"
    # Once another attempt started, the stalled worker cannot take the lease back.
    store.redis.delete(store.keys.lease(job))
    assert store.start(job, "w2").attempts == 2
    assert not store.renew_lease(job, "w1", ttl=5, attempt=1)
    assert store.redis.get(store.keys.lease(job)) is None


def test_a_requeued_job_is_queued_at_once_with_its_position_event_and_message(
    store: JobStore,
) -> None:
    first = create(store)
    later = create(store)
    assert store.acquire_lease(first, "dead", ttl=0.05)
    store.start(first, "dead")
    store.progress(first, "denoise", 3, 10)
    assert store.stale_jobs(older_than=0.2) == []  # started too recently
    time.sleep(0.25)
    assert store.stale_jobs(older_than=0.2) == [first]

    assert store.requeue(first, 0.2, MESSAGE) == 1
    record = store.get(first)
    assert record is not None and record.status is JobStatus.queued
    assert record.progress is None and record.attempts == 1
    # It was dequeued first, so it goes back ahead of the job submitted after it.
    assert record.queue_position == 1
    later_record = store.get(later)
    assert later_record is not None and later_record.queue_position == 2
    event = store.read_events(first)[-1]
    assert (event.event, event.data) == ("requeued", {"status": "queued", "attempt": 1})
    assert store.redis.lrange(MESSAGE[0], 0, -1) == [MESSAGE[1]]
    assert store.stale_jobs(older_than=0) == []
    assert store.requeue(first, 0, MESSAGE) is None
    assert store.redis.llen(MESSAGE[0]) == 1


def test_a_requeued_job_is_the_next_one_out_and_says_so(store: JobStore) -> None:
    """The position a requeued job reports is the order a worker takes messages in (BRPOP, so
    the right end of the list is the head), also when two lost jobs come back in either order."""
    queue = MESSAGE[0]

    def message(job: str) -> tuple[str, str]:
        return queue, f'{{"job": "{job}"}}'

    def take_next() -> str:
        taken = store.redis.rpop(queue)
        assert isinstance(taken, str)
        return str(json.loads(taken)["job"])

    oldest, older, waiting = (create(store, message) for _ in range(3))
    for job in (oldest, older):
        assert take_next() == job
        store.start(job, "dead")
    # The older job's worker is found dead first, then the oldest's: the last one back is ahead.
    assert store.requeue(older, 0, message(older)) == 1
    assert store.requeue(oldest, 0, message(oldest)) == 1
    records = {job: store.get(job) for job in (oldest, older, waiting)}
    positions = {job: r.queue_position for job, r in records.items() if r is not None}
    assert positions == {oldest: 1, older: 2, waiting: 3}
    assert [take_next() for _ in range(3)] == [oldest, older, waiting]


def test_a_job_with_a_live_lease_or_an_end_is_not_requeued(store: JobStore) -> None:
    leased = create(store)
    assert store.acquire_lease(leased, "alive", ttl=30)
    store.start(leased, "alive")
    ended = create(store)
    store.take(ended, now=time.time() - 60)
    store.cancel(ended)
    assert store.requeue(leased, 0, MESSAGE) is None
    assert store.requeue(ended, 0, MESSAGE) is None
    assert store.redis.zscore(store.keys.taken, ended) is None  # cleaned up on the way
    # Under the fair policy the taken message was a start for the model, whichever job it named
    # (claim.lua): its worker died, so it is replaced; the ended job itself is not requeued.
    assert store.queue_policy == "fair"
    assert store.redis.llen(MESSAGE[0]) == 1
    assert store.get(ended).status.value == "canceled"  # type: ignore[union-attr]


def test_a_job_taken_but_never_started_is_recovered(store: JobStore) -> None:
    job = create(store)
    other = create(store)
    store.take(job, now=time.time() - 10)  # a worker took the message and died
    store.take(other)  # taken just now: its worker may be about to start it
    assert store.stale_jobs(older_than=5) == [job]
    assert store.requeue(job, 5, MESSAGE) == 0
    record = store.get(job)
    assert record is not None and record.status is JobStatus.queued and record.queue_position == 1
    assert store.redis.lrange(MESSAGE[0], 0, -1) == [MESSAGE[1]]
    # Starting a job clears the note, so a running job is watched by its lease alone.
    store.take(other, now=time.time() - 10)
    assert store.acquire_lease(other, "w", ttl=30)
    assert store.start(other, "w").outcome == "started"
    assert store.stale_jobs(older_than=5) == []
    store.take(job)
    assert store.untake(job)
    assert store.stale_jobs(older_than=0) == []
