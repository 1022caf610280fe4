"""Webhook signing, retry schedule and delivery, against a real Redis and a loopback receiver."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from standardwebhooks import Webhook

import worker.logs
from masactrl_jobs.schema import ControlInput, JobInput, JobKind, WebhookCreate
from masactrl_jobs.store import JobStore
from tests.worker.helpers import REPO_ROOT, WebhookReceiver
from worker.webhooks import (
    Deliverer,
    Emitter,
    RetryPolicy,
    RetryScheduler,
    build_body,
    sign,
)

NEW_SECRET = "whsec_" + base64.b64encode(b"the new secret of tenant acme!!!").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"the old secret of tenant acme!!!").decode()


def _documented_verify() -> Callable[[str, dict[str, str], bytes], bool]:
    """The standard-library ``verify`` from docs/workers.md, executed as written."""
    text = (REPO_ROOT / "docs" / "workers.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    source = next(block for block in blocks if "def verify(" in block)
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    return namespace["verify"]


verify_with_hmac = _documented_verify()


@pytest.fixture()
def store(redis_url: str) -> Iterator[JobStore]:
    store = JobStore.from_url(redis_url)
    yield store
    store.close()


@pytest.fixture()
def receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


class FakeApp:
    """Records send_task calls instead of publishing (the e2e tests use the real broker)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], str]] = []

    def send_task(self, name: str, args: list[Any], queue: str) -> None:
        self.sent.append((name, args, queue))


def render(record: Any) -> dict[str, Any]:
    return {"id": record.id, "status": record.status.value}


@pytest.fixture()
def make_deliverer(store: JobStore) -> Callable[..., Deliverer]:
    def make(**overrides: Any) -> Deliverer:
        values: dict[str, Any] = {
            "policy": RetryPolicy(delays=[0.01, 0.01], max_attempts=3, max_delay=1, jitter=0),
            "render": render,
            "timeout": 5.0,
            "allow_loopback_http": True,
        }
        values.update(overrides)
        return Deliverer(store, **values)

    return make


def create_job(store: JobStore, url: str, events: list[str] | None = None) -> str:
    webhook = WebhookCreate(url=url, events=events or ["started", "progress", "completed"])
    result = store.create(
        tenant="acme",
        kind=JobKind.synthesis,
        model="tiny",
        input=JobInput(
            source_prompt="a cat",
            target_prompts=["a dog"],
            seed=1,
            steps=2,
            guidance_scale=7.5,
            width=64,
            height=64,
            control=ControlInput(start_step=1, start_layer=10),
        ),
        webhook=webhook,
        webhook_secrets=[NEW_SECRET, OLD_SECRET],
    )
    assert result.job_id is not None
    return result.job_id


def finish(store: JobStore, job_id: str) -> None:
    assert store.acquire_lease(job_id, "w", 30)
    store.start(job_id, "w")
    assert store.succeed(job_id, [], {}).ok


# --- signing ---------------------------------------------------------------------------------


def test_signatures_verify_with_either_secret_during_a_rotation() -> None:
    body = build_body("job.succeeded", "2026-01-01T00:00:00Z", {"id": "j"})
    now = int(time.time())
    header = sign([NEW_SECRET, OLD_SECRET], "msg_1", now, body)
    assert len(header.split(" ")) == 2 and all(s.startswith("v1,") for s in header.split(" "))
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": header}
    for secret in (NEW_SECRET, OLD_SECRET):
        assert Webhook(secret).verify(body, headers) == json.loads(body)
        assert verify_with_hmac(secret, headers, body)
    other = "whsec_" + base64.b64encode(b"somebody else's secret, 32 bytes").decode()
    assert not verify_with_hmac(other, headers, body)
    assert not verify_with_hmac(NEW_SECRET, headers, body + b" ")


def test_the_retry_schedule_grows_then_stops() -> None:
    policy = RetryPolicy(delays=[5, 300, 1800, 7200], max_attempts=8, max_delay=10 * 3600, jitter=0)
    delays = [policy.delay_after(attempt) for attempt in range(1, 9)]
    assert delays == [5, 300, 1800, 7200, 14400, 28800, 36000, None]
    jittered = RetryPolicy(delays=[100], max_attempts=3, max_delay=1000, jitter=0.1)
    assert jittered.delay_after(1, rand=lambda: 0.5) == pytest.approx(105)


# --- delivery ----------------------------------------------------------------------------------


def test_events_are_delivered_in_order_signed_and_shaped(
    store: JobStore, receiver: WebhookReceiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    job_id = create_job(store, receiver.url())
    app = FakeApp()
    emitter = Emitter(store, app, render)  # type: ignore[arg-type]
    record = store.get(job_id)
    assert record is not None
    emitter.emit(record, "job.started", suffix="1")
    emitter.emit(record, "job.progress", suffix="a")
    emitter.emit(record, "job.progress", suffix="b")  # makes the one before stale
    finish(store, job_id)
    emitter.emit_terminal(job_id)
    assert [sent[0] for sent in app.sent] == ["masactrl.deliver_webhook"] * 4

    assert make_deliverer().drain(job_id) == 3
    bodies = [r.json() for r in receiver.received]
    assert [b["type"] for b in bodies] == ["job.started", "job.progress", "job.succeeded"]
    assert bodies[-1]["data"] == {"id": job_id, "status": "succeeded"}
    assert receiver.received[1].headers["webhook-id"] == f"msg_{job_id}_progress_b"
    for request in receiver.received:
        Webhook(OLD_SECRET).verify(request.body, request.headers)
        assert {k.lower(): v for k, v in request.headers.items()}["content-type"] == (
            "application/json"
        )
    deliveries = store.get(job_id).deliveries  # type: ignore[union-attr]
    assert [(d["event"], d["attempt"], d["status_code"]) for d in deliveries] == [
        ("job.started", 1, 200),
        ("job.progress", 1, 200),
        ("job.succeeded", 1, 200),
    ]
    # A second drain finds nothing; a duplicate of a sent event is skipped.
    assert make_deliverer().drain(job_id) == 0
    emitter.emit_terminal(job_id)
    assert make_deliverer().drain(job_id) == 0
    assert len(receiver.received) == 3


def test_unsubscribed_events_are_not_queued(store: JobStore, receiver: WebhookReceiver) -> None:
    job_id = create_job(store, receiver.url(), events=["completed"])
    emitter = Emitter(store, FakeApp(), render)  # type: ignore[arg-type]
    record = store.get(job_id)
    assert record is not None
    assert not emitter.emit(record, "job.started")
    assert not emitter.emit(record, "job.progress")
    finish(store, job_id)
    assert emitter.emit_terminal(job_id)
    assert store.redis.llen(store.keys.webhook_outbox(job_id)) == 1


def test_failures_are_retried_and_every_attempt_is_recorded(
    store: JobStore, receiver: WebhookReceiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    receiver.statuses = [500, 503]
    job_id = create_job(store, receiver.url(), events=["completed"])
    finish(store, job_id)
    app = FakeApp()
    Emitter(store, app, render).emit_terminal(job_id)  # type: ignore[arg-type]
    deliverer = make_deliverer()
    scheduler = RetryScheduler(store, app)  # type: ignore[arg-type]

    deliverer.drain(job_id)
    for _ in range(2):
        time.sleep(0.05)
        app.sent.clear()
        assert scheduler.run_once() == 1
        (_name, args, queue), *_ = app.sent
        assert queue == "masactrl.webhooks"
        deliverer.deliver(*args)

    deliveries = store.get(job_id).deliveries  # type: ignore[union-attr]
    assert [(d["attempt"], d["status_code"]) for d in deliveries] == [(1, 500), (2, 503), (3, 200)]
    assert deliveries[0]["error"] == "HTTP 500" and "next_attempt_at" in deliveries[0]
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    assert scheduler.run_once() == 0


def test_gone_stops_and_redirects_are_failures_not_followed(
    store: JobStore, receiver: WebhookReceiver, make_deliverer: Callable[..., Deliverer]
) -> None:
    receiver.statuses = [410]
    gone = create_job(store, receiver.url(), events=["completed"])
    finish(store, gone)
    make_deliverer().deliver(gone, {"type": "job.succeeded"})
    assert store.redis.zcard(store.keys.webhook_schedule) == 0
    assert store.get(gone).deliveries[0]["status_code"] == 410  # type: ignore[union-attr]

    receiver.statuses = [302]
    moved = create_job(store, receiver.url("/moved"), events=["completed"])
    finish(store, moved)
    make_deliverer().deliver(moved, {"type": "job.succeeded"})
    delivery = store.get(moved).deliveries[0]  # type: ignore[union-attr]
    assert delivery["status_code"] == 302 and "not followed" in delivery["error"]
    assert store.redis.zcard(store.keys.webhook_schedule) == 1
    assert [r.path for r in receiver.received] == ["/hook", "/moved"]  # never /elsewhere


def test_addresses_the_guard_refuses_are_not_retried(
    store: JobStore, make_deliverer: Callable[..., Deliverer]
) -> None:
    job_id = create_job(store, "http://127.0.0.1:9/hook", events=["completed"])
    finish(store, job_id)
    make_deliverer(allow_loopback_http=False).deliver(job_id, {"type": "job.succeeded"})
    delivery = store.get(job_id).deliveries[0]  # type: ignore[union-attr]
    assert delivery["status_code"] is None and "not allowed" in delivery["error"]
    assert store.redis.zcard(store.keys.webhook_schedule) == 0


def test_connection_errors_are_retried(
    store: JobStore, make_deliverer: Callable[..., Deliverer]
) -> None:
    from tests.conftest import free_port

    job_id = create_job(store, f"http://127.0.0.1:{free_port()}/hook", events=["completed"])
    finish(store, job_id)
    make_deliverer().deliver(job_id, {"type": "job.succeeded"})
    delivery = store.get(job_id).deliveries[0]  # type: ignore[union-attr]
    assert delivery["status_code"] is None and "cannot connect" in delivery["error"]
    assert store.redis.zcard(store.keys.webhook_schedule) == 1


# --- bearer material in logs, the retry scheduler ----------------------------------------------


@pytest.fixture()
def redacting_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The worker process's log redaction, undone after the test."""
    before = logging.getLogRecordFactory()
    monkeypatch.setattr(worker.logs, "_installed", False)
    worker.logs.install_log_redaction()
    yield
    logging.setLogRecordFactory(before)


def test_webhook_url_tokens_never_reach_the_log(
    store: JobStore,
    receiver: WebhookReceiver,
    make_deliverer: Callable[..., Deliverer],
    redacting_logs: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = "tok_" + "s3cr3t" * 4
    url = receiver.url(f"/hook?token={token}")
    receiver.scripts[f"/hook?token={token}"] = [500]
    job_id = create_job(store, url, events=["completed"])
    finish(store, job_id)
    Emitter(store, FakeApp(), render).emit_terminal(job_id)  # type: ignore[arg-type]
    deliverer = make_deliverer()
    with caplog.at_level(logging.DEBUG):
        deliverer.drain(job_id)  # fails with 500: a warning and a scheduled retry
        message = json.loads(store.claim_due_webhooks(now=time.time() + 60)[0])["message"]
        deliverer.deliver(job_id, message)
    assert len(receiver.received) == 2  # the token did reach the receiver ...
    assert receiver.received[0].path.endswith(token)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP Request: POST" in logged  # ... and httpx did log both requests ...
    assert token not in logged  # ... without it
    assert "/hook?[redacted]" in logged


def test_a_broker_failure_mid_batch_loses_no_due_retry(store: JobStore) -> None:
    now = time.time()
    for n in range(3):
        store.schedule_webhook({"job_id": f"j{n}", "message": {"n": n}}, now - 1)

    class FlakyApp(FakeApp):
        def send_task(self, name: str, args: list[Any], queue: str) -> None:
            if len(self.sent) == 1:
                raise ConnectionError("broker restarting")
            super().send_task(name, args, queue)

    app = FlakyApp()
    with pytest.raises(ConnectionError):
        RetryScheduler(store, app).run_once()  # type: ignore[arg-type]
    assert [args[0] for _, args, _ in app.sent] == ["j0"]
    # The sent one is gone from the schedule; the other two are due again within seconds.
    later = FakeApp()
    assert RetryScheduler(store, later).run_once() == 0  # type: ignore[arg-type]
    time.sleep(1.1)
    assert RetryScheduler(store, later).run_once() == 2  # type: ignore[arg-type]
    assert sorted(args[0] for _, args, _ in later.sent) == ["j1", "j2"]
    assert store.claim_due_webhooks(now=time.time() + 3600) == []
