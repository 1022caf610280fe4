"""JobRunner in-process on the tiny engine, against a real Redis and a file store.

These pin the exactly-once protocol and the error classification without Celery in between;
test_e2e.py drives the same code through real worker processes.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from masactrl_core import ControlConfig
from masactrl_jobs.catalog import load_catalog
from masactrl_jobs.queue import RUN_JOB_TASK, make_celery, queue_name
from masactrl_jobs.schema import ControlInput, JobInput, JobKind, JobStatus, WebhookCreate
from masactrl_jobs.storage import FileStorage, StorageUnavailable
from masactrl_jobs.store import ErrorRecord, JobStore
from tests.worker.helpers import tiny_catalog
from worker.config import WorkerSettings
from worker.inversion_cache import InversionCache
from worker.janitor import Janitor
from worker.outputs import png_bytes
from worker.runner import JobRunner
from worker.webhooks import Emitter

SECRET = "whsec_" + "dGVzdCB3ZWJob29rIHNlY3JldCwgMzIgYnl0ZXMhIQ=="


@pytest.fixture()
def settings(redis_url: str, tmp_path: Path, tiny_checkpoint: Path) -> WorkerSettings:
    return WorkerSettings(
        _env_file=None,
        environment="development",
        redis_url=redis_url,
        storage_url=(tmp_path / "storage").as_uri(),
        catalog=tiny_catalog(tiny_checkpoint),
        recovery_seconds=2,
        storage_retry_attempts=2,
        storage_retry_max_wait_seconds=0.05,
        progress_interval_seconds=0,
        webhook_progress_interval_seconds=0,
    )


@pytest.fixture()
def app(settings: WorkerSettings) -> Any:
    return make_celery(settings.redis_url)


@pytest.fixture()
def make_runner(
    settings: WorkerSettings, store: JobStore, storage: Any, app: Any, tiny_engine: Any
) -> Callable[..., JobRunner]:
    def make(**overrides: Any) -> JobRunner:
        values: dict[str, Any] = {
            "settings": settings,
            "entry": load_catalog(settings).get("tiny"),
            "engine": tiny_engine,
            "store": store,
            "storage": storage,
            "app": app,
            "emitter": Emitter(store, app, lambda record: {"id": record.id}),
            "worker_id": "test-worker",
            "cache": InversionCache(storage, store, retention_seconds=3600, max_entries=100),
        }
        values.update(overrides)
        return JobRunner(**values)

    return make


def job_input(**overrides: Any) -> JobInput:
    values: dict[str, Any] = {
        "source_prompt": "a photo of a cat",
        "target_prompts": ["a photo of a dog"],
        "seed": 7,
        "steps": 3,
        "guidance_scale": 7.5,
        "width": 64,
        "height": 64,
        "control": ControlInput(start_step=1, start_layer=10),
    }
    values.update(overrides)
    return JobInput(**values)


def create_job(store: JobStore, kind: JobKind = JobKind.synthesis, **kwargs: Any) -> str:
    webhook = kwargs.pop("webhook", None)
    result = store.create(
        tenant="acme",
        kind=kind,
        model="tiny",
        input=job_input(**kwargs),
        webhook=webhook,
        webhook_secrets=[SECRET] if webhook else [],
    )
    assert result.job_id is not None
    return result.job_id


def job_error(store: JobStore, job_id: str) -> ErrorRecord:
    """The recorded error of a job that must have failed."""
    record = store.get(job_id)
    assert record is not None and record.error is not None
    return record.error


def photo_png(seed: int = 0) -> bytes:
    image = Image.effect_noise((64, 64), 40 + seed).convert("RGB")
    return png_bytes(image)


def put_input(storage: FileStorage, data: bytes) -> str:
    import hashlib

    key = f"inputs/{hashlib.sha256(data).hexdigest()}.png"
    storage.put(key, data, "image/png")
    return key


class CountingStorage:
    """A storage wrapper that counts calls and can fail them."""

    def __init__(self, inner: FileStorage, fail_puts: bool = False) -> None:
        self.inner = inner
        self.fail_puts = fail_puts
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if name == "put" and self.fail_puts:
                raise StorageUnavailable("S3 put failed: SlowDown")
            return attribute(*args, **kwargs)

        return call


class FailingEngine:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def synthesize(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error

    edit = synthesize

    def prompt_warnings(self, prompts: Any) -> list[str]:
        return []  # a model that declares no vocabulary


# --- success, byte-identical to the engine ------------------------------------------------------


def test_synthesis_succeeds_with_results_identical_to_the_engine(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    tiny_engine: Any,
) -> None:
    job_id = create_job(store)
    assert make_runner().run(job_id) == "succeeded"

    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.succeeded
    assert record.attempts == 1
    metrics = record.metrics or {}
    assert metrics["unet_image_evals"] > 0 and metrics["denoise_seconds"] > 0
    assert metrics["inversion_seconds"] == 0
    assert {"queue_seconds", "total_seconds"} <= metrics.keys()
    assert store.redis.get(store.keys.lease(job_id)) is None

    expected = tiny_engine.synthesize(
        "a photo of a cat",
        ["a photo of a dog"],
        seed=7,
        steps=3,
        width=64,
        height=64,
        control=ControlConfig(start_step=1, start_layer=10),
    )
    assert record.output is not None
    images = record.output.images
    assert [(i.role, i.key.rsplit("/", 1)[1]) for i in images] == [
        ("source", "source_0.png"),
        ("target", "target_0.png"),
    ]
    assert storage.get(images[0].key) == png_bytes(expected.source)
    assert storage.get(images[1].key) == png_bytes(expected.targets[0])
    # Progress went to the job's event stream, ending at the last step.
    progress = [e.data for e in store.read_events(job_id) if e.event == "progress"]
    assert progress[-1] == {"phase": "denoise", "step": 3, "total": 3, "fraction": 1.0}


# --- the exactly-once protocol ------------------------------------------------------------------


def test_prompt_words_outside_the_models_vocabulary_are_the_jobs_warnings(
    make_runner: Callable[..., JobRunner], store: JobStore, tiny_engine: Any
) -> None:
    import copy

    from masactrl_core.vocabulary import Vocabulary

    # The tiny engine as if its checkpoint declared a vocabulary (a shallow copy: same weights).
    engine = copy.copy(tiny_engine)
    engine.vocabulary = Vocabulary.of(["a", "photo", "of", "cat", "dog"])
    runner = make_runner(engine=engine)

    unknown = create_job(store, target_prompts=["a photo of a dog", "a house"])
    assert runner.run(unknown) == "succeeded"
    record = store.get(unknown)
    assert record is not None
    assert record.warnings == engine.vocabulary.warnings([("target_prompts[1]", "a house")])
    assert record.warnings[0].startswith("target_prompts[1]: the model does not know the word")
    assert (
        record.to_public(base_url="http://x", url_for=lambda key: key, url_ttl_seconds=60).warnings
        == record.warnings
    )

    known = create_job(store)
    assert runner.run(known) == "succeeded"
    record = store.get(known)
    assert record is not None and record.warnings == []

    # A failed job keeps them too: the unknown word may be why the user looks at it.
    failing = create_job(store, width=72, negative_prompt="blurry")
    assert runner.run(failing) == "failed"
    record = store.get(failing)
    assert record is not None and record.warnings[0].startswith("negative_prompt: ")


def test_a_job_cancelled_while_queued_is_dropped_without_reading_anything(
    make_runner: Callable[..., JobRunner], store: JobStore, storage: FileStorage
) -> None:
    job_id = create_job(store, JobKind.edit, image="inputs/" + "0" * 64 + ".png")
    assert store.cancel(job_id).outcome == "canceled"
    counting = CountingStorage(storage)

    assert make_runner(storage=counting).run(job_id) == "dropped"
    assert counting.calls == []
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.canceled and record.attempts == 0


def test_a_terminal_job_is_dropped(make_runner: Callable[..., JobRunner], store: JobStore) -> None:
    job_id = create_job(store)
    runner = make_runner()
    assert runner.run(job_id) == "succeeded"
    assert runner.run(job_id) == "dropped"
    record = store.get(job_id)
    assert record is not None and record.attempts == 1


def test_a_job_whose_lease_is_alive_elsewhere_is_dropped(
    make_runner: Callable[..., JobRunner], store: JobStore
) -> None:
    job_id = create_job(store)
    assert store.acquire_lease(job_id, "other-worker", ttl=30)
    assert make_runner().run(job_id) == "leased"
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.queued and record.attempts == 0
    assert store.redis.get(store.keys.lease(job_id)) == "other-worker"


def test_a_job_whose_worker_died_runs_again_with_attempts_incremented(
    make_runner: Callable[..., JobRunner], store: JobStore, storage: FileStorage
) -> None:
    job_id = create_job(store)
    # A worker took the job and died: its lease lapses, the job stays `running`.
    assert store.acquire_lease(job_id, "dead-worker", ttl=0.1)
    assert store.start(job_id, "dead-worker").attempts == 1
    time.sleep(0.2)

    assert make_runner().run(job_id) == "succeeded"
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.succeeded and record.attempts == 2
    assert storage.list_prefix(f"results/{job_id}/") == [
        f"results/{job_id}/source_0.png",
        f"results/{job_id}/target_0.png",
    ]


def test_a_job_that_keeps_killing_its_worker_fails(
    make_runner: Callable[..., JobRunner], store: JobStore, settings: WorkerSettings
) -> None:
    job_id = create_job(store)
    for _ in range(settings.max_attempts):
        assert store.acquire_lease(job_id, "dead-worker", ttl=0.05)
        store.start(job_id, "dead-worker")
        time.sleep(0.1)
    assert make_runner().run(job_id) == "failed"
    record = store.get(job_id)
    assert record is not None and record.error is not None
    assert record.error.code == "worker_lost"


def test_the_janitor_requeues_a_job_whose_lease_lapsed_once(
    store: JobStore, app: Any, redis_url: str
) -> None:
    import json

    import redis

    job_id = create_job(store, webhook=WebhookCreate(url="https://example.com/hook"))
    assert store.acquire_lease(job_id, "dead-worker", ttl=0.1)
    store.start(job_id, "dead-worker")
    store.progress(job_id, "denoise", 2, 3)
    janitor = Janitor(store, lease_ttl=0.2, emitter=Emitter(store, app, lambda r: {"id": r.id}))
    assert janitor.run_once() == []  # the lease is still alive
    time.sleep(0.5)

    assert janitor.run_once() == [job_id]
    # Queued again at once, with its position: never a stale `running` at step 2 of 3.
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.queued
    assert record.queue_position == 1 and record.progress is None
    assert store.read_events(job_id)[-1].event == "requeued"
    outbox = store.redis.lrange(store.keys.webhook_outbox(job_id), 0, -1)
    assert [json.loads(m)["type"] for m in outbox][-1] == "job.requeued"
    time.sleep(0.3)
    assert janitor.run_once() == []  # its new message is still waiting: no duplicate
    client = redis.Redis.from_url(redis_url)
    assert client.llen(queue_name("tiny")) == 1


def test_a_job_whose_worker_died_before_starting_it_is_recovered_before_the_visibility_timeout(
    make_runner: Callable[..., JobRunner], store: JobStore, app: Any, redis_url: str
) -> None:
    import redis

    job_id = create_job(store)

    class DiesBeforeStart:
        """The worker's process dies between taking the message and starting the job."""

        def __getattr__(self, name: str) -> Any:
            if name == "claim":
                raise SystemExit("killed")
            return getattr(store, name)

    with pytest.raises(SystemExit):
        make_runner(store=DiesBeforeStart()).run(job_id)
    store.release_lease(job_id, "test-worker")  # its lease would lapse; no need to wait
    janitor = Janitor(store, lease_ttl=0.2)
    assert janitor.run_once() == []  # it may still be about to start the job
    time.sleep(0.3)
    assert janitor.run_once() == [job_id]
    assert redis.Redis.from_url(redis_url).llen(queue_name("tiny")) == 1
    assert make_runner().run(job_id) == "succeeded"
    record = store.get(job_id)
    assert record is not None and record.attempts == 1
    assert janitor.run_once() == []


def test_the_janitor_forgets_the_notes_of_taken_jobs_that_ended_or_expired(
    store: JobStore,
) -> None:
    ended, expired = create_job(store), create_job(store)
    for job_id in (ended, expired):
        store.take(job_id, now=time.time() - 60)  # its worker died before starting it
    assert store.cancel(ended).outcome == "canceled"
    assert store.purge_jobs([expired]) == 1
    assert Janitor(store, lease_ttl=0.2).run_once() == []
    assert store.stale_jobs(older_than=0) == []


def test_a_queued_job_cancelled_between_read_and_start_announces_its_cancellation(
    make_runner: Callable[..., JobRunner], store: JobStore
) -> None:
    import json

    job_id = create_job(store, webhook=WebhookCreate(url="https://example.com/hook"))

    class CancelBeforeStart:
        """The client's cancel lands between the worker's read and its start."""

        def __getattr__(self, name: str) -> Any:
            attribute = getattr(store, name)
            if name != "claim":
                return attribute

            def start(*args: Any, **kwargs: Any) -> Any:
                assert store.cancel(job_id).outcome == "canceled"
                return attribute(*args, **kwargs)

            return start

    assert make_runner(store=CancelBeforeStart()).run(job_id) == "dropped"
    outbox = store.redis.lrange(store.keys.webhook_outbox(job_id), 0, -1)
    assert [json.loads(m)["type"] for m in outbox] == ["job.canceled"]
    assert store.redis.zscore(store.keys.taken, job_id) is None


class _Frozen:
    """A store seen from a frozen process (SIGSTOP): every call waits until it is thawed."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.thawed = threading.Event()
        self.thawed.set()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.store, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.thawed.wait()
            return attribute(*args, **kwargs)

        return call


@pytest.mark.parametrize("late_worker_ends_by", ["failing", "succeeding"])
def test_a_worker_stalled_past_its_lease_can_neither_end_the_job_nor_delete_its_results(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    tiny_engine: Any,
    late_worker_ends_by: str,
) -> None:
    job_id = create_job(store)
    frozen = _Frozen(store)
    stalled, resume = threading.Event(), threading.Event()

    class StallingEngine:
        """Stalls mid-run (as under SIGSTOP), then fails or finishes."""

        def synthesize(self, *args: Any, **kwargs: Any) -> Any:
            frozen.thawed.clear()  # the whole process stops: its lease heartbeat too
            stalled.set()
            resume.wait(30)
            if late_worker_ends_by == "failing":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return tiny_engine.synthesize(*args, **kwargs)

        prompt_warnings = tiny_engine.prompt_warnings

    late = make_runner(store=frozen, engine=StallingEngine(), worker_id="worker-a")
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(late.run(job_id)))
    thread.start()
    try:
        assert stalled.wait(30)
        # Its lease lapses; the janitor requeues the job and worker B runs it.
        wait_for_lapse = time.monotonic() + 5
        while store.redis.exists(store.keys.lease(job_id)) and time.monotonic() < wait_for_lapse:
            time.sleep(0.05)
        time.sleep(0.2)
        assert Janitor(store, lease_ttl=0.5).run_once() == [job_id]
        assert make_runner(worker_id="worker-b").run(job_id) == "succeeded"
        winner = store.get(job_id)
        assert winner is not None and winner.attempts == 2
        results = storage.list_prefix(f"results/{job_id}/")
        assert len(results) == 2
    finally:
        frozen.thawed.set()
        resume.set()
        thread.join(60)

    assert outcome in (["conflict"], ["abandoned"])
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.succeeded
    assert record.metrics is not None and record.metrics["attempt"] == 2
    assert record.output == winner.output
    assert storage.list_prefix(f"results/{job_id}/") == results
    assert [e.event for e in store.read_events(job_id)].count("succeeded") == 1


def test_a_running_job_rides_through_a_redis_restart(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    settings: WorkerSettings,
    redis_server: Any,
) -> None:
    job_id = create_job(store, steps=12)
    restarted = threading.Event()

    def slow_step(_: float) -> None:
        time.sleep(0.15)
        record = None
        with contextlib.suppress(Exception):
            record = store.get(job_id)
        if not restarted.is_set() and record and record.progress and record.progress.step >= 3:
            restarted.set()
            redis_server.stop()
            time.sleep(settings.lease_ttl * 0.8)  # Redis stays away for most of a lease
            redis_server.start()

    runner = make_runner(
        settings=settings.model_copy(update={"step_delay_seconds": 0.001, "recovery_seconds": 6.0}),
        sleep=slow_step,
    )
    assert runner.run(job_id) == "succeeded"
    assert restarted.is_set()
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.succeeded and record.attempts == 1


# --- cancel, errors ------------------------------------------------------------------------------


def test_cancel_stops_the_run_within_a_step_and_leaves_no_results(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    settings: WorkerSettings,
) -> None:
    job_id = create_job(store, steps=20)
    steps_seen: list[int] = []

    def slow_step(_: float) -> None:
        record = store.get(job_id)
        step = record.progress.step if record and record.progress else 0
        steps_seen.append(step)
        if len(steps_seen) == 5:
            store.cancel(job_id)

    runner = make_runner(
        settings=settings.model_copy(update={"step_delay_seconds": 0.001}), sleep=slow_step
    )
    assert runner.run(job_id) == "canceled"
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.canceled
    assert record.output is None
    # Cancelled after step 5 was reported: the engine stops before computing step 6.
    assert record.progress is not None and record.progress.step <= 6
    assert storage.list_prefix(f"results/{job_id}/") == []
    assert [e.event for e in store.read_events(job_id)][-1] == "canceled"


def test_bad_input_found_by_the_worker_fails_the_job_and_the_next_job_runs(
    make_runner: Callable[..., JobRunner], store: JobStore, storage: FileStorage
) -> None:
    key = put_input(storage, b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)  # a PNG header, no image
    bad = create_job(store, JobKind.edit, image=key)
    good = create_job(store)
    runner = make_runner()

    assert runner.run(bad) == "failed"
    record = store.get(bad)
    assert record is not None and record.status is JobStatus.failed
    assert record.error is not None and record.error.code == "invalid_input"
    assert "cannot be decoded" in record.error.message
    assert runner.run(good) == "succeeded"


def test_a_missing_input_object_is_invalid_input(
    make_runner: Callable[..., JobRunner], store: JobStore
) -> None:
    job_id = create_job(store, JobKind.edit, image="inputs/" + "a" * 64 + ".png")
    assert make_runner().run(job_id) == "failed"
    error = job_error(store, job_id)
    assert error.code == "invalid_input" and "no longer in storage" in error.message


def test_engine_input_errors_are_invalid_input(
    make_runner: Callable[..., JobRunner], store: JobStore
) -> None:
    # 72 is not a multiple of 16: a catalog that let it through is caught by the engine.
    job_id = create_job(store, width=72)
    assert make_runner().run(job_id) == "failed"
    error = job_error(store, job_id)
    assert error.code == "invalid_input" and "multiple of 16" in error.message


def test_a_control_beyond_this_workers_model_is_invalid_input(
    make_runner: Callable[..., JobRunner], store: JobStore
) -> None:
    # The gateway's catalog may disagree with the model this worker loaded: the worker checks.
    job_id = create_job(store, control=ControlInput(start_step=1, start_layer=16))
    calls: list[Any] = []
    engine = SimpleNamespace(
        synthesize=lambda *a, **k: calls.append(a), prompt_warnings=lambda prompts: []
    )
    runner = make_runner(engine=engine)
    assert runner.run(job_id) == "failed"
    assert calls == []  # refused before the engine ran
    error = store.get(job_id).error  # type: ignore[union-attr]
    assert error == ErrorRecord(
        code="invalid_input",
        message="start_layer must be less than 16 (tiny has 16 transformer blocks), got 16",
    )


def test_out_of_memory_fails_with_a_hint_and_the_worker_stays_usable(
    make_runner: Callable[..., JobRunner], store: JobStore
) -> None:
    import torch

    job_id = create_job(store, target_prompts=["a", "b", "c"])
    runner = make_runner(engine=FailingEngine(torch.cuda.OutOfMemoryError("CUDA out of memory")))
    assert runner.run(job_id) == "failed"
    error = job_error(store, job_id)
    assert error.code == "out_of_memory"
    assert "smaller width/height or fewer target prompts" in error.message
    assert make_runner().run(create_job(store)) == "succeeded"


def test_soft_time_limit_fails_with_timeout(
    make_runner: Callable[..., JobRunner], store: JobStore
) -> None:
    job_id = create_job(store)
    assert make_runner(engine=FailingEngine(SoftTimeLimitExceeded())).run(job_id) == "failed"
    assert job_error(store, job_id).code == "timeout"


def test_storage_errors_are_retried_then_fail_as_storage_unavailable(
    make_runner: Callable[..., JobRunner], store: JobStore, storage: FileStorage
) -> None:
    job_id = create_job(store)
    failing = CountingStorage(storage, fail_puts=True)
    assert make_runner(storage=failing).run(job_id) == "failed"
    assert failing.calls.count("put") == 2  # storage_retry_attempts
    error = job_error(store, job_id)
    assert error.code == "storage_unavailable"


def test_unexpected_errors_fail_without_a_traceback(
    make_runner: Callable[..., JobRunner], store: JobStore
) -> None:
    job_id = create_job(store)
    assert make_runner(engine=FailingEngine(KeyError("boom"))).run(job_id) == "failed"
    assert job_error(store, job_id) == ErrorRecord(
        "internal_error", "the worker hit an unexpected error (logged)"
    )


# --- inversion cache -----------------------------------------------------------------------------


def test_a_second_edit_of_the_same_image_skips_inversion(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    tiny_engine: Any,
) -> None:
    key = put_input(storage, photo_png())
    runner = make_runner()
    first = create_job(store, JobKind.edit, image=key, target_prompts=["a photo of a dog"])
    second = create_job(store, JobKind.edit, image=key, target_prompts=["a red car"])
    assert runner.run(first) == "succeeded"
    assert runner.run(second) == "succeeded"

    m1 = store.get(first).metrics or {}  # type: ignore[union-attr]
    m2 = store.get(second).metrics or {}  # type: ignore[union-attr]
    assert m1["inversion_seconds"] > 0 and m2["inversion_seconds"] == 0
    assert m2["unet_image_evals"] == m1["unet_image_evals"] - 3  # 3 inversion steps, batch 1
    assert len(storage.list_prefix("cache/inversions/tiny/")) == 1

    # The cached latents give exactly the images of a fresh run.
    image = Image.open(io.BytesIO(storage.get(key))).convert("RGB")
    expected = tiny_engine.edit(
        image,
        ["a red car"],
        source_prompt="a photo of a cat",
        seed=7,
        steps=3,
        width=64,
        height=64,
        control=ControlConfig(start_step=1, start_layer=10),
    )
    output = store.get(second).output  # type: ignore[union-attr]
    assert output is not None
    assert storage.get(output.images[1].key) == png_bytes(expected.targets[0])


def test_the_inversion_cache_forgets_old_and_excess_entries(
    store: JobStore, storage: FileStorage
) -> None:
    cache = InversionCache(storage, store, retention_seconds=100, max_entries=2)
    for name in ("a", "b", "c"):
        cache.save(f"cache/inversions/tiny/{name}.safetensors", b"x")
    store.touch_inversion("cache/inversions/tiny/a.safetensors", now=time.time() - 1000)
    assert cache.sweep() == 1
    assert storage.list_prefix("cache/inversions/") == [
        "cache/inversions/tiny/b.safetensors",
        "cache/inversions/tiny/c.safetensors",
    ]
    cache.max_entries = 1
    assert cache.sweep() == 1
    assert storage.list_prefix("cache/inversions/") == ["cache/inversions/tiny/c.safetensors"]


# --- webhook events --------------------------------------------------------------------------


def test_subscribed_events_are_queued_in_order(
    make_runner: Callable[..., JobRunner], store: JobStore
) -> None:
    import json

    job_id = create_job(store, webhook=WebhookCreate(url="https://example.com/hook"))
    only_completed = create_job(
        store, webhook=WebhookCreate(url="https://example.com/hook", events=["completed"])
    )
    runner = make_runner()
    runner.run(job_id)
    runner.run(only_completed)

    outbox = store.keys.webhook_outbox
    types = [json.loads(m)["type"] for m in store.redis.lrange(outbox(job_id), 0, -1)]
    assert types[0] == "job.started" and types[-1] == "job.succeeded"
    assert set(types[1:-1]) == {"job.progress"}
    only = [json.loads(m)["type"] for m in store.redis.lrange(outbox(only_completed), 0, -1)]
    assert only == ["job.succeeded"]


# --- masks -----------------------------------------------------------------------------------


def test_manual_masks_are_read_from_storage_and_passed_to_the_engine(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    tiny_engine: Any,
) -> None:
    from masactrl_core import MaskConfig
    from masactrl_jobs.schema import MaskControl, MaskRegion

    left = Image.new("L", (64, 64), 0)
    left.paste(255, (0, 0, 32, 64))
    right = Image.new("L", (64, 64), 0)
    right.paste(255, (32, 0, 64, 64))
    source_key, target_key = (
        put_input(storage, png_bytes(left)),
        put_input(storage, png_bytes(right)),
    )
    mask = MaskControl(mode="manual", regions=[MaskRegion(source=source_key, target=target_key)])
    job_id = create_job(store, control=ControlInput(start_step=1, start_layer=10, mask=mask))
    assert make_runner().run(job_id) == "succeeded"

    expected = tiny_engine.synthesize(
        "a photo of a cat",
        ["a photo of a dog"],
        seed=7,
        steps=3,
        width=64,
        height=64,
        control=ControlConfig(start_step=1, start_layer=10),
        masks=MaskConfig(regions=[(left, right)]),
    )
    output = store.get(job_id).output  # type: ignore[union-attr]
    assert output is not None
    assert storage.get(output.images[1].key) == png_bytes(expected.targets[0])


def test_a_mask_word_missing_from_the_prompt_is_invalid_input(
    make_runner: Callable[..., JobRunner], store: JobStore
) -> None:
    from masactrl_jobs.schema import MaskControl

    mask = MaskControl(mode="auto", source_word="cat", target_word="giraffe")
    job_id = create_job(store, control=ControlInput(start_step=1, start_layer=10, mask=mask))
    assert make_runner().run(job_id) == "failed"
    assert job_error(store, job_id).code == "invalid_input"


# --- the hard time limit (recorded by the pool's parent process) ------------------------------


def hard_timeout(settings: WorkerSettings, job_id: str, killed_pid: int) -> None:
    """What the pool's parent does when the hard time limit killed child ``killed_pid``."""
    from celery.contrib.testing.mocks import TaskMessage

    from worker import runtime
    from worker.celery_app import create_worker_app
    from worker.tasks import JobRequest

    app = create_worker_app(settings)  # the worker's own app, where run_job is registered
    request = JobRequest(
        TaskMessage(RUN_JOB_TASK, args=[job_id]), app=app, task=app.tasks[RUN_JOB_TASK]
    )
    request.worker_pid = killed_pid
    runtime.configure(settings, app, "gpu", entry=load_catalog(settings).get("tiny"), source="-")
    try:
        request.on_timeout(False, 660)
    finally:
        runtime.reset()


def test_a_hard_time_limit_kill_is_recorded_as_timeout(
    settings: WorkerSettings, store: JobStore
) -> None:
    from worker.runtime import new_worker_id

    killed_child = new_worker_id("tiny")  # this test's pid stands for the killed child's
    job_id = create_job(store)
    assert store.acquire_lease(job_id, killed_child, ttl=30)
    store.start(job_id, killed_child)
    hard_timeout(settings, job_id, os.getpid())
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.failed
    assert record.error is not None and record.error.code == "timeout"
    assert "hard limit" in record.error.message
    assert store.redis.get(store.keys.lease(job_id)) is None


def test_a_hard_time_limit_kill_does_not_fail_a_later_attempt(
    settings: WorkerSettings, store: JobStore
) -> None:
    from worker.runtime import new_worker_id

    killed_child = new_worker_id("tiny")
    job_id = create_job(store)
    assert store.start(job_id, killed_child).attempts == 1
    # Attempt 1 stalled past its lease; another worker's child took the job over.
    other_child = f"{socket.gethostname()}:tiny:{os.getpid() + 1}:0a1b2c"
    assert store.acquire_lease(job_id, other_child, ttl=30)
    assert store.start(job_id, other_child).attempts == 2
    hard_timeout(settings, job_id, os.getpid())
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.running and record.error is None
    assert record.attempts == 2 and record.worker_id == other_child
    assert store.redis.get(store.keys.lease(job_id)) is not None
    assert store.succeed(job_id, [], attempt=2).ok
