"""The Redis job store on a real redis-server: transitions, indexes, streams, limits, leases."""

from __future__ import annotations

import asyncio
import time

import pytest

from masactrl_jobs.ids import id_datetime, is_job_id, new_id
from masactrl_jobs.schema import (
    ControlInput,
    JobInput,
    JobKind,
    JobStatus,
    MaskControl,
    MaskRegion,
    WebhookCreate,
)
from masactrl_jobs.store import AsyncJobStore, ErrorRecord, JobStore


def make_input(**overrides: object) -> JobInput:
    values: dict[str, object] = {
        "source_prompt": "a cat",
        "target_prompts": ["a cat standing"],
        "seed": 1,
        "steps": 10,
        "guidance_scale": 7.5,
        "width": 512,
        "height": 512,
        "control": ControlInput(start_step=4, start_layer=10),
    }
    values.update(overrides)
    return JobInput.model_validate(values)


@pytest.fixture()
def store(redis_url: str) -> JobStore:
    s = JobStore.from_url(redis_url, retention_seconds=3600)
    yield s
    s.close()


def create(store: JobStore, tenant: str = "acme", model: str = "sd15", **kwargs: object) -> str:
    result = store.create(
        tenant=tenant, kind=JobKind.synthesis, model=model, input=make_input(), **kwargs
    )
    assert result.outcome == "created"
    return result.job_id


def test_ids_sort_by_creation_time() -> None:
    ids = [new_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(is_job_id(i) for i in ids)
    assert abs(id_datetime(ids[0]).timestamp() - time.time()) < 5


def test_create_get_and_queue_positions(store: JobStore) -> None:
    first = create(store)
    second = create(store)
    other_model = create(store, model="sdxl")
    assert store.get(first).queue_position == 1
    assert store.get(second).queue_position == 2
    assert store.get(other_model).queue_position == 1
    assert store.queue_depths(["sd15", "sdxl", "tiny"]) == {"sd15": 2, "sdxl": 1, "tiny": 0}
    record = store.get(first)
    assert record.status is JobStatus.queued
    assert record.tenant == "acme" and record.kind is JobKind.synthesis
    assert record.input.target_prompts == ["a cat standing"]
    assert store.get("01890000-0000-7000-8000-000000000000") is None


def test_full_lifecycle_events_and_public_rendering(store: JobStore) -> None:
    job = create(store)
    started = store.start(job, "worker-1")
    assert started.outcome == "started" and started.attempts == 1
    assert store.get(job).queue_position is None
    assert store.queue_depths(["sd15"]) == {"sd15": 0}
    assert store.progress(job, "denoise", 5, 10).updated
    images = [
        {
            "role": "source",
            "prompt": "a cat",
            "key": f"results/{job}/source_0.png",
            "width": 512,
            "height": 512,
        }
    ]
    assert store.succeed(job, images, {"denoise_seconds": 1.5, "unet_image_evals": 40}).ok
    record = store.get(job)
    assert record.status is JobStatus.succeeded
    public = record.to_public(
        base_url="http://gw", url_for=lambda key: f"http://files/{key}", url_ttl_seconds=60
    )
    assert public.output.images[0].url == f"http://files/results/{job}/source_0.png"
    assert public.metrics.denoise_seconds == 1.5 and public.metrics.total_seconds is not None
    assert public.progress.fraction == 0.5
    assert public.urls.self_ == f"http://gw/v1/jobs/{job}"
    dumped = public.model_dump(mode="json")
    assert dumped["urls"]["self"].endswith(job)
    events = store.read_events(job)
    assert [e.event for e in events] == ["status", "status", "progress", "succeeded"]
    assert events[-1].is_terminal
    # Resuming after an id gives only what followed it.
    assert [e.event for e in store.read_events(job, after=events[1].id)] == [
        "progress",
        "succeeded",
    ]
    # Terminal: no further transition.
    assert store.fail(job, "x", "y").outcome == "conflict"
    assert store.cancel(job).outcome == "conflict"
    assert store.start(job, "worker-2").outcome == "terminal"
    assert store.progress(job, "denoise", 6, 10).updated is False


def test_cancel_queued_is_immediate_and_running_is_flagged(store: JobStore) -> None:
    queued = create(store)
    assert store.cancel(queued).outcome == "canceled"
    assert store.get(queued).status is JobStatus.canceled
    assert store.queue_depths(["sd15"])["sd15"] == 0
    assert store.start(queued, "w").outcome == "terminal"

    running = create(store)
    store.start(running, "w")
    assert store.cancel(running).outcome == "flagged"
    assert store.cancel_requested(running)
    assert store.progress(running, "denoise", 1, 10).cancel_requested
    assert store.get(running).status is JobStatus.running
    # A redelivered message of a job that was asked to stop does not run it again.
    assert store.start(running, "w2").outcome == "cancel_requested"
    assert store.finish_canceled(running).ok
    assert store.get(running).status is JobStatus.canceled


def test_idempotency_record_is_atomic_with_creation(store: JobStore) -> None:
    first = store.create(
        tenant="acme",
        kind=JobKind.synthesis,
        model="sd15",
        input=make_input(),
        request_hash="h1",
        idempotency_key="key-1",
    )
    again = store.create(
        tenant="acme",
        kind=JobKind.synthesis,
        model="sd15",
        input=make_input(),
        request_hash="h2",
        idempotency_key="key-1",
    )
    assert again.outcome == "duplicate"
    assert again.job_id == first.job_id and again.request_hash == "h1"
    assert store.idempotency("acme", "key-1") == ("h1", first.job_id)
    # Keys are per tenant.
    assert store.idempotency("other", "key-1") is None
    ttl = store.redis.ttl(store.keys.idempotency("acme", "key-1"))
    assert 0 < ttl <= 3600


def test_queue_depth_limit_is_checked_in_the_same_step(store: JobStore) -> None:
    for _ in range(2):
        assert (
            store.create(
                tenant="t",
                kind=JobKind.synthesis,
                model="sd15",
                input=make_input(),
                max_queue_depth=2,
            ).outcome
            == "created"
        )
    full = store.create(
        tenant="t", kind=JobKind.synthesis, model="sd15", input=make_input(), max_queue_depth=2
    )
    assert full.outcome == "full"


def test_list_newest_first_with_cursor_and_status_filter(store: JobStore) -> None:
    ids = [create(store) for _ in range(7)]
    create(store, tenant="other")
    store.start(ids[2], "w")
    page, cursor = store.list("acme", limit=3)
    assert [r.id for r in page] == ids[::-1][:3]
    page2, cursor2 = store.list("acme", limit=3, cursor=cursor)
    assert [r.id for r in page2] == ids[::-1][3:6]
    page3, cursor3 = store.list("acme", limit=3, cursor=cursor2)
    assert [r.id for r in page3] == ids[:1] and cursor3 is None
    running, _ = store.list("acme", status=JobStatus.running)
    assert [r.id for r in running] == [ids[2]]


def test_rate_limit_token_bucket(store: JobStore) -> None:
    results = [store.rate_limit("acme", rate=1, burst=3) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert 0 < results[-1].retry_after <= 1
    assert store.rate_limit("other", rate=1, burst=3).allowed


def test_leases_attempts_and_stale_jobs(store: JobStore) -> None:
    job = create(store)
    assert store.acquire_lease(job, "w1", ttl=0.2)
    assert not store.acquire_lease(job, "w2", ttl=10)
    assert store.start(job, "w1").attempts == 1
    assert store.renew_lease(job, "w1", ttl=0.2, attempt=1)
    assert not store.renew_lease(job, "w2", ttl=10, attempt=1)
    assert store.stale_jobs(older_than=0) == []
    time.sleep(0.3)
    assert store.stale_jobs(older_than=0) == [job]
    message = ("masactrl.sd15", "{}")
    assert store.requeue(job, 0, message) == 1
    assert store.requeue(job, 0, message) is None  # a second janitor finds nothing to do
    assert store.acquire_lease(job, "w2", ttl=10)
    assert store.start(job, "w2").attempts == 2
    assert store.release_lease(job, "w2")
    assert not store.release_lease(job, "w2")


def test_worker_registry(store: JobStore) -> None:
    assert store.live_models() == set()
    store.register_worker("sd15", "w1", ttl=0.3)
    store.register_worker("tiny", "w2", ttl=30)
    assert store.live_models() == {"sd15", "tiny"}
    time.sleep(0.4)
    assert store.live_models() == {"tiny"}
    store.unregister_worker("tiny", "w2")
    assert store.live_models() == set()


def test_webhook_deliveries_and_secrets_stay_private(store: JobStore) -> None:
    job = create(
        store,
        webhook=WebhookCreate(url="https://example.com/hook"),
        webhook_secrets=["whsec_abc"],
    )
    store.record_delivery(
        job,
        {
            "event": "job.started",
            "at": "2024-01-01T00:00:00+00:00",
            "status_code": 204,
            "duration_ms": 3.2,
        },
    )
    record = store.get(job)
    assert record.webhook_secrets == ["whsec_abc"]
    public = record.to_public(base_url="http://gw", url_for=str, url_ttl_seconds=1)
    assert public.webhook.deliveries[0].status_code == 204
    assert "whsec" not in public.model_dump_json()
    assert not store.record_delivery("01890000-0000-7000-8000-000000000000", {"event": "x"})


def test_expiry_purges_every_trace(store: JobStore) -> None:
    masks = MaskControl(
        mode="manual", regions=[MaskRegion(source="inputs/a.png", target="inputs/b.png")]
    )
    job = store.create(
        tenant="acme",
        kind=JobKind.edit,
        model="sd15",
        idempotency_key="k",
        input=make_input(
            image="inputs/c.png", control=ControlInput(start_step=1, start_layer=1, mask=masks)
        ),
    ).job_id
    assert store.cancel(job).outcome == "canceled"
    assert store.expired_jobs() == []
    later = time.time() + 7200
    assert store.expired_jobs(now=later) == [job]
    assert store.purge_jobs([job]) == 1
    assert store.get(job) is None
    assert store.list("acme")[0] == []
    assert store.idempotency("acme", "k") is None
    assert store.read_events(job) == []
    assert sorted(store.expired_inputs(now=later)) == [
        "inputs/a.png",
        "inputs/b.png",
        "inputs/c.png",
    ]
    assert store.forget_inputs(["inputs/a.png"], now=time.time()) == []
    assert store.forget_inputs(["inputs/a.png"], now=later) == ["inputs/a.png"]


def test_finished_job_keys_get_a_ttl(store: JobStore) -> None:
    job = create(store)
    assert store.redis.ttl(store.keys.job(job)) == -1
    store.fail(job, "invalid_input", "bad")
    assert store.redis.ttl(store.keys.job(job)) > 3600
    record = store.get(job)
    assert record.error == ErrorRecord("invalid_input", "bad")
    assert [e.event for e in store.read_events(job)][-1] == "failed"


def test_async_store_matches(redis_url: str) -> None:
    async def scenario() -> None:
        store = AsyncJobStore.from_url(redis_url)
        try:
            assert await store.ping()
            result = await store.create(
                tenant="acme", kind=JobKind.synthesis, model="sd15", input=make_input()
            )
            job = result.job_id
            assert (await store.get(job)).queue_position == 1
            waiter = asyncio.create_task(store.wait_events(job, after="0", block_ms=2000))
            assert [e.event for e in await waiter] == ["status"]
            last = (await store.read_events(job))[-1].id
            pending = asyncio.create_task(store.wait_events(job, after=last, block_ms=2000))
            await asyncio.sleep(0.05)
            assert (await store.cancel(job)).outcome == "canceled"
            assert [e.event for e in await pending] == ["canceled"]
            records, cursor = await store.list("acme")
            assert [r.id for r in records] == [job] and cursor is None
            assert (await store.rate_limit("acme", 1, 1)).allowed
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_running_job_keeps_its_latest_preview_and_streams_each_one(store: JobStore) -> None:
    from masactrl_jobs.schema import ImageRole
    from masactrl_jobs.store import PreviewImageRecord, PreviewRecord

    job = create(store)

    def preview(step: int) -> PreviewRecord:
        images = [
            PreviewImageRecord(ImageRole.source, 0, f"results/{job}/previews/{step}/source_0.webp"),
            PreviewImageRecord(ImageRole.target, 0, f"results/{job}/previews/{step}/target_0.webp"),
        ]
        return PreviewRecord(step, 10, images)

    # Only a running job takes previews.
    assert store.preview(job, preview(2)).updated is False
    store.start(job, "worker-1")
    assert store.preview(job, preview(5)).updated
    assert store.preview(job, preview(10)).updated
    record = store.get(job)
    assert record.preview == preview(10)
    events = [e for e in store.read_events(job) if e.event == "preview"]
    assert [PreviewRecord.from_json(e.data) for e in events] == [preview(5), preview(10)]

    public = record.to_public(
        base_url="http://gw",
        url_for=lambda key: f"http://long/{key}",
        url_ttl_seconds=60,
        preview_url_for=lambda key: f"http://short/{key}",
    )
    assert public.preview is not None and public.preview.step == 10
    shown = [(i.role.value, i.index, i.url) for i in public.preview.images]
    assert shown == [
        ("source", 0, f"http://short/results/{job}/previews/10/source_0.webp"),
        ("target", 0, f"http://short/results/{job}/previews/10/target_0.webp"),
    ]
    # Cancellation rides on the answer, as with progress; an ended job shows no preview.
    store.cancel(job)
    assert store.preview(job, preview(10)).cancel_requested
    assert store.succeed(job, []).ok
    assert store.preview(job, preview(10)).updated is False
    ended = store.get(job).to_public(base_url="http://gw", url_for=str, url_ttl_seconds=60)
    assert ended.preview is None
