"""The queue policy on a real redis-server: which job a worker's message starts (fair share
between tenants by weight, priority then submission order within a tenant, deadlines), the
queue positions the store reports, and retries. Each start is one ``claim`` as a worker makes it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest

from masactrl_jobs.ids import new_id
from masactrl_jobs.schema import ControlInput, JobInput, JobKind, JobStatus
from masactrl_jobs.store import JobStore

MODEL = "sd15"
MESSAGE = ("masactrl.sd15", '{"body": "run it"}')


@pytest.fixture()
def store(redis_url: str) -> Iterator[JobStore]:
    s = JobStore.from_url(redis_url, retention_seconds=3600)
    yield s
    s.close()


def submit(
    store: JobStore,
    tenant: str,
    *,
    priority: int = 0,
    weight: float = 1.0,
    deadline_at: float | None = None,
    now: float | None = None,
) -> str:
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
        tenant=tenant,
        kind=JobKind.synthesis,
        model=MODEL,
        input=job_input,
        job_id=job_id,
        priority=priority,
        weight=weight,
        deadline_at=deadline_at,
        now=now,
    )
    assert result.outcome == "created"
    return job_id


def start_next(store: JobStore, message_job: str = "any") -> str | None:
    """What one worker's message starts now (the job it names matters only under FIFO)."""
    claimed = store.claim(message_job, MODEL, "worker-1", lease_ttl=30)
    return claimed.job_id


def tenant_of(store: JobStore, job_id: str) -> str:
    record = store.get(job_id)
    assert record is not None
    return record.tenant


def positions(store: JobStore, jobs: list[str]) -> list[int | None]:
    return [r.queue_position if (r := store.get(j)) else None for j in jobs]


def test_a_light_tenant_starts_next_to_a_heavy_tenants_batch(store: JobStore) -> None:
    heavy = [submit(store, "heavy") for _ in range(30)]
    assert start_next(store) == heavy[0]  # one running already
    light = submit(store, "light")
    # The heavy tenant has had its start; the light one is next, 29 heavy jobs notwithstanding.
    assert store.get(light).queue_position == 1  # type: ignore[union-attr]
    assert store.get(heavy[1]).queue_position == 2  # type: ignore[union-attr]
    assert [start_next(store) for _ in range(2)] == [light, heavy[1]]


def test_positions_are_the_order_jobs_start(store: JobStore) -> None:
    # Three tenants, weights 1, 2 and 1, uneven batches and priorities: every queued job's
    # reported position is exactly when it starts.
    jobs = [submit(store, "a", priority=p) for p in (0, 0, 5, 0)]
    jobs += [submit(store, "b", weight=2.0) for _ in range(5)]
    jobs += [submit(store, "c", priority=-1), submit(store, "c")]
    expected = sorted(jobs, key=lambda j: store.get(j).queue_position)  # type: ignore[union-attr]
    assert sorted(positions(store, jobs)) == list(range(1, len(jobs) + 1))
    started = [start_next(store) for _ in jobs]
    assert started == expected
    assert start_next(store) is None


def test_weights_three_to_one_hold_within_one_start(store: JobStore) -> None:
    for _ in range(40):
        submit(store, "big", weight=3.0)
        submit(store, "small", weight=1.0)
    counts: Counter[str] = Counter()
    for n in range(1, 41):
        job = start_next(store)
        assert job is not None
        counts[tenant_of(store, job)] += 1
        # After n starts, each tenant is within one start of its share.
        assert abs(counts["big"] - 0.75 * n) <= 1
        assert abs(counts["small"] - 0.25 * n) <= 1
    assert counts == {"big": 30, "small": 10}


def test_priority_then_submission_order_within_a_tenant(store: JobStore) -> None:
    low = submit(store, "a", priority=-5)
    first = submit(store, "a")
    second = submit(store, "a")
    urgent = submit(store, "a", priority=10)
    assert positions(store, [urgent, first, second, low]) == [1, 2, 3, 4]
    assert [start_next(store) for _ in range(4)] == [urgent, first, second, low]


def test_an_idle_tenant_banks_no_credit(store: JobStore) -> None:
    # "early" runs alone for a while; "late" arriving then gets its share from now on, not the
    # starts it missed while it had nothing queued.
    early = [submit(store, "early") for _ in range(12)]
    for job in early[:8]:
        assert start_next(store) == job
    late = [submit(store, "late") for _ in range(4)]
    started = [start_next(store) for _ in range(8)]
    tenants = [tenant_of(store, j) for j in started if j is not None]
    assert Counter(tenants[:4]) == {"early": 2, "late": 2}
    assert set(late) <= set(started)


def test_fifo_policy_starts_the_job_the_message_names(redis_url: str) -> None:
    fifo = JobStore.from_url(redis_url, queue_policy="fifo")
    try:
        a = [submit(fifo, "a") for _ in range(3)]
        b = submit(fifo, "b")
        assert fifo.get(b).queue_position == 4  # type: ignore[union-attr]
        assert start_next(fifo, b) == b
        assert start_next(fifo, b) is None  # already running: a duplicate message starts nothing
        assert [start_next(fifo, j) for j in a] == a
    finally:
        fifo.close()


def test_a_claim_starts_each_job_once_and_takes_its_lease(store: JobStore) -> None:
    jobs = [submit(store, "a") for _ in range(3)]
    started = [store.claim("x", MODEL, f"w{i}", 30) for i in range(4)]
    assert [c.job_id for c in started[:3]] == jobs
    assert started[3].outcome == "none"
    for i, claimed in enumerate(started[:3]):
        assert claimed.attempts == 1
        assert store.redis.get(store.keys.lease(claimed.job_id)) == f"w{i}"
        assert store.get(claimed.job_id).status is JobStatus.running  # type: ignore[union-attr]
    assert store.queue_depths([MODEL]) == {MODEL: 0}


def test_a_job_past_its_deadline_expires_and_never_starts(store: JobStore) -> None:
    now = time.time()
    late = submit(store, "a", deadline_at=now + 0.2)
    kept = submit(store, "a", deadline_at=now + 3600)
    time.sleep(0.3)
    claimed = store.claim("x", MODEL, "w", 30)
    assert claimed.job_id == kept and claimed.ended == (late,)
    record = store.get(late)
    assert record is not None and record.status is JobStatus.expired
    events = [e.event for e in store.read_events(late)]
    assert events == ["status", "expired"]
    # Ended once: a later decision or sweep neither starts nor ends it again.
    assert store.claim(late, MODEL, "w", 30).outcome == "none"
    assert store.expire_due([MODEL]) == []
    assert store.start(late, "w").outcome == "terminal"
    assert [e.event for e in store.read_events(late)] == ["status", "expired"]


def test_the_sweep_expires_queued_jobs_only(store: JobStore) -> None:
    now = time.time()
    queued = submit(store, "a", deadline_at=now + 0.2)
    started = submit(store, "a", deadline_at=now + 0.2)
    assert store.claim(started, MODEL, "w", 30).job_id == queued  # oldest first
    time.sleep(0.3)
    assert store.expire_due([MODEL]) == [started]
    assert store.get(queued).status is JobStatus.running  # type: ignore[union-attr]
    assert store.get(started).status is JobStatus.expired  # type: ignore[union-attr]
    assert store.queue_depths([MODEL]) == {MODEL: 0}


def test_a_retry_links_both_jobs_once(store: JobStore) -> None:
    job = submit(store, "a")
    assert store.cancel(job).outcome == "canceled"
    original = store.get(job)
    assert original is not None
    retry = store.create(
        tenant="a",
        kind=original.kind,
        model=MODEL,
        input=original.input,
        retry_of=job,
        priority=3,
    )
    assert retry.outcome == "created" and retry.record is not None
    assert retry.record.retry_of == job and retry.record.priority == 3
    assert store.get(job).retried_by == retry.job_id  # type: ignore[union-attr]
    assert store.get(retry.job_id).retry_of == job  # type: ignore[arg-type, union-attr]
    again = store.create(
        tenant="a", kind=original.kind, model=MODEL, input=original.input, retry_of=job
    )
    assert again.outcome == "retried" and again.job_id == retry.job_id
    other = store.create(
        tenant="b", kind=original.kind, model=MODEL, input=original.input, retry_of=job
    )
    assert other.outcome == "missing"
    assert retry.job_id is not None
    queued = store.create(
        tenant="a", kind=original.kind, model=MODEL, input=original.input, retry_of=retry.job_id
    )
    assert queued.outcome == "not_retryable" and queued.previous == "queued"


def test_a_cancelled_or_purged_job_leaves_the_policy_clean(store: JobStore) -> None:
    a = submit(store, "a")
    b = submit(store, "b", deadline_at=time.time() + 60)
    store.cancel(a)
    store.purge_jobs([b])
    assert store.redis.exists(store.keys.active_tenants(MODEL)) == 0
    assert store.redis.exists(store.keys.deadlines(MODEL)) == 0
    assert start_next(store) is None


def test_a_requeued_job_goes_back_to_the_head_of_its_tenants_queue(store: JobStore) -> None:
    first, second = submit(store, "a"), submit(store, "a")
    assert store.claim("x", MODEL, "dead", 30).job_id == first
    store.redis.delete(store.keys.lease(first))  # the worker died
    assert store.requeue(first, 0, MESSAGE) == 1
    assert positions(store, [first, second]) == [1, 2]
    claimed = store.claim("x", MODEL, "w", 30)
    assert (claimed.job_id, claimed.attempts) == (first, 2)


def test_the_census_counts_queued_jobs_by_tenant_and_priority_and_expirations(
    store: JobStore,
) -> None:
    submit(store, "a", priority=2)
    submit(store, "a", priority=2)
    submit(store, "a", priority=-3)
    submit(store, "b")
    submit(store, "b", deadline_at=time.time() + 0.1)
    time.sleep(0.2)
    assert len(store.expire_due([MODEL])) == 1
    queued, expired = store.queue_census([MODEL, "other"])
    assert queued == {(MODEL, "a", 2): 2, (MODEL, "a", -3): 1, (MODEL, "b", 0): 1}
    assert expired == {MODEL: 1, "other": 0}


def test_the_api_guides_worked_example(store: JobStore) -> None:
    # docs/api.md, "A worked example": the table and the two positions it quotes.
    b = [submit(store, "batch") for _ in range(6)]
    assert start_next(store) == b[0]
    s1, s2 = submit(store, "shop", weight=3), submit(store, "shop", weight=3)
    s3 = submit(store, "shop", weight=3, priority=5)
    assert positions(store, [s1, b[1]]) == [2, 4]
    assert [start_next(store) for _ in range(5)] == [s3, s1, s2, b[1], b[2]]


def test_a_message_lost_with_its_worker_is_replaced_even_when_its_job_ran_elsewhere(
    store: JobStore,
) -> None:
    # Under fair share a message is a start for the model. Worker 1 takes the message naming x
    # and dies before deciding; worker 2's message (naming y) starts x, the policy's head. y is
    # still queued and one message short: the janitor's requeue of x's stale note replaces it.
    x, y = submit(store, "a"), submit(store, "a")
    store.take(x, now=time.time() - 60)
    store.take(y)
    assert store.claim(y, MODEL, "worker-2", 30).job_id == x
    assert store.requeue(x, 10, MESSAGE) is None  # x runs under a live lease: not yet
    store.succeed(x, [], attempt=1)
    assert store.requeue(x, 10, MESSAGE) is None  # x is not requeued ...
    assert store.redis.llen(MESSAGE[0]) == 1  # ... but the lost message is replaced
    assert store.redis.zscore(store.keys.taken, x) is None
    assert store.claim("replacement", MODEL, "worker-3", 30).job_id == y
    assert store.get(x).attempts == 1  # type: ignore[union-attr]
