"""The workers' operations on a real redis-server: webhook bookkeeping, janitor markers, cache."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from masactrl_jobs.store import JobStore
from masactrl_jobs.store.worker_operations import (
    WEBHOOK_BOOKKEEPING_TTL_SECONDS,
    WEBHOOK_CLAIM_SECONDS,
)


@pytest.fixture()
def store(redis_url: str) -> Iterator[JobStore]:
    s = JobStore.from_url(redis_url)
    yield s
    s.close()


def test_the_outbox_keeps_order_and_expires(store: JobStore) -> None:
    for n in range(3):
        assert store.push_webhook("j1", {"id": f"m{n}", "type": "job.progress"})
    assert [json.loads(m)["id"] for m in store.peek_webhooks("j1")] == ["m0", "m1"]
    assert store.webhook_backlog("j1") == 3
    assert store.pop_webhook("j1")
    assert [json.loads(m)["id"] for m in store.peek_webhooks("j1", count=5)] == ["m1", "m2"]
    ttl = store.redis.ttl(store.keys.webhook_outbox("j1"))
    assert WEBHOOK_BOOKKEEPING_TTL_SECONDS - 5 < ttl <= WEBHOOK_BOOKKEEPING_TTL_SECONDS
    assert store.pop_webhook("j1") and store.pop_webhook("j1")
    assert not store.pop_webhook("j1") and store.peek_webhooks("j1") == []


def test_one_drainer_holds_the_lock(store: JobStore) -> None:
    assert store.lock_webhooks("j1", "a", ttl=5)
    assert not store.lock_webhooks("j1", "b", ttl=5)
    assert not store.renew_webhook_lock("j1", "b", ttl=5)
    assert not store.unlock_webhooks("j1", "b")
    assert store.renew_webhook_lock("j1", "a", ttl=5)
    assert store.unlock_webhooks("j1", "a")
    assert store.lock_webhooks("j1", "b", ttl=5)


def test_sent_ids_are_remembered_for_a_while(store: JobStore) -> None:
    assert not store.webhook_sent("j1", "msg_1")
    store.mark_webhook_sent("j1", "msg_1")
    assert store.webhook_sent("j1", "msg_1") and not store.webhook_sent("j1", "msg_2")
    assert store.redis.ttl(store.keys.webhook_sent("j1")) > 0


def test_a_due_retry_survives_a_scheduler_that_dies(store: JobStore) -> None:
    now = time.time()
    store.schedule_webhook({"job_id": "j1", "message": {"attempt": 2}}, now - 1)
    store.schedule_webhook({"job_id": "j2", "message": {"attempt": 2}}, now + 100)
    claimed = store.claim_due_webhooks(now=now)
    assert [json.loads(r)["job_id"] for r in claimed] == ["j1"]
    # A second scheduler does not get the claimed retry ...
    assert store.claim_due_webhooks(now=now) == []
    # ... but if the first never confirms (it died), the retry comes due again.
    again = store.claim_due_webhooks(now=now + WEBHOOK_CLAIM_SECONDS + 1)
    assert again == claimed
    assert store.forget_webhooks(again) == 1
    later = store.claim_due_webhooks(now=now + 1000)
    assert [json.loads(r)["job_id"] for r in later] == ["j2"]
    assert store.forget_webhooks([]) == 0


def test_stale_inversions_are_the_unused_then_the_least_recently_used(store: JobStore) -> None:
    now = time.time()
    store.touch_inversion("old", now=now - 500)
    for n, key in enumerate(["b", "c", "d"]):
        store.touch_inversion(key, now=now + n)
    assert store.stale_inversions(now - 100, max_entries=10) == ["old"]
    assert store.stale_inversions(now - 100, max_entries=2) == ["old", "b"]
    assert store.stale_inversions(now - 1000, max_entries=1) == ["old", "b", "c"]
    assert store.forget_inversion("old") and not store.forget_inversion("old")
    assert store.stale_inversions(now - 100, max_entries=10) == []
