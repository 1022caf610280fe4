"""The Celery app both sides share, without any task code: the gateway sends by task name.

Importing this module imports Celery and kombu only; the worker registers its tasks on the app it
gets from :func:`make_celery` and adds its own consumer settings (acks_late, prefetch, limits).
With the Redis transport each queue is a Redis list named after it, e.g. ``masactrl.sd15``.

The gateway does not publish through kombu on its hot path: :class:`TaskMessages` has Celery build
one ``masactrl.run_job`` message in memory at start-up and stamps a copy per job, and the job
store pushes it onto the queue's list in the same Lua script that records the job. The job and
its message exist together or not at all, and a submission costs one Redis round trip instead of
kombu's ~0.3 ms of CPU per publish (measured in bench/gateway.py).
"""

from __future__ import annotations

import base64
import copy
import json
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from celery import Celery

if TYPE_CHECKING:
    from masactrl_jobs.store.connection import RedisTarget

__all__ = [
    "DELIVER_WEBHOOK_TASK",
    "RUN_JOB_TASK",
    "WEBHOOK_QUEUE",
    "TaskMessages",
    "broker_of",
    "enqueue_job",
    "make_celery",
    "queue_name",
]

RUN_JOB_TASK = "masactrl.run_job"
DELIVER_WEBHOOK_TASK = "masactrl.deliver_webhook"
WEBHOOK_QUEUE = "masactrl.webhooks"


def queue_name(model: str) -> str:
    """The queue of one catalog model's GPU workers."""
    return f"masactrl.{model}"


def broker_of(target: RedisTarget) -> tuple[str, dict[str, Any]]:
    """The kombu broker URL and transport options that reach ``target``'s Redis.

    With Sentinel: kombu's ``sentinel://host:port;sentinel://host:port/db`` form, each entry with
    the master's credentials, and the master's name as the ``master_name`` transport option.
    """
    if not target.uses_sentinel:
        return target.url, {}
    master = target.master_options()
    user, password = master.get("username") or "", master.get("password") or ""
    credentials = ""
    if user or password:
        credentials = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    db = int(master.get("db") or 0)
    url = ";".join(f"sentinel://{credentials}{host}:{port}/{db}" for host, port in target.sentinels)
    options: dict[str, Any] = {"master_name": target.sentinel_master}
    if target.sentinel_password:
        options["sentinel_kwargs"] = {"password": target.sentinel_password}
    return url, options


def make_celery(
    broker_url: str | RedisTarget,
    *,
    visibility_timeout: float | None = None,
    connect_timeout: float = 2.0,
    **config: Any,
) -> Celery:
    """A Celery app on the Redis broker at ``broker_url``; ``config`` overrides any setting.

    ``broker_url`` is a URL, or a ``RedisTarget`` (``settings.redis_target``) that may name a
    Sentinel-managed master. ``visibility_timeout`` matters to consumers only: an unacknowledged
    message is redelivered after it, so it must exceed the longest job (the workers pass theirs).
    """
    transport: dict[str, Any]
    if isinstance(broker_url, str):
        url, transport = broker_url, {}
    else:
        url, transport = broker_of(broker_url)
    app = Celery("masactrl", broker=url, set_as_current=False)
    timeouts = {
        # A dead broker must fail a submission quickly (the gateway answers 503), not hang it.
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": 10.0,
    }
    transport |= timeouts
    if "sentinel_kwargs" in transport:
        # Given sentinel_kwargs, redis-py no longer copies the timeouts to the sentinels: a dead
        # sentinel must not hang the question "where is the master?" either.
        transport["sentinel_kwargs"] = {**transport["sentinel_kwargs"], **timeouts}
    if visibility_timeout is not None:
        transport["visibility_timeout"] = visibility_timeout
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Job state lives in the job store; a Celery result backend would be a second truth.
        task_ignore_result=True,
        task_create_missing_queues=True,
        broker_transport_options=transport,
        broker_connection_timeout=connect_timeout,
        broker_connection_retry_on_startup=True,
        # A publish that cannot reach Redis is retried briefly, then surfaces as an error the
        # gateway turns into a 503 and a failed job.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.1,
            "interval_max": 0.2,
        },
        enable_utc=True,
    )
    app.conf.update(config)
    return app


def enqueue_job(app: Celery, job_id: str, model: str) -> None:
    """Send ``masactrl.run_job(job_id)`` to the model's queue."""
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue_name(model))


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def _uuid4() -> str:
    """``str(uuid.uuid4())`` without building a ``UUID`` object (two per message)."""
    h = "%032x" % (int.from_bytes(os.urandom(16), "big") & _UUID4_CLEAR | _UUID4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class TaskMessages:
    """``masactrl.run_job`` messages as kombu's Redis transport stores them, ready to LPUSH.

    The template comes from Celery itself (a ``send_task`` on an in-memory broker with this
    module's settings), so headers, properties and encodings are whatever the installed Celery
    writes; only the ids, the arguments and the routing key change per job.
    """

    _PLACEHOLDER = "00000000-0000-0000-0000-000000000000"
    _PROBE_MODEL = "template"

    # Start-up self-check. This class leans on interfaces Celery and kombu do not promise, so on
    # an upgrade of either, re-check: kombu's in-memory channel still has ``_get`` (used to read
    # the probe message back); the Redis transport still stores a message as this JSON with a
    # base64 body and routes by ``properties.delivery_info.routing_key``; Celery still sends
    # task protocol 2 (task name and id in the headers, body ``[args, kwargs, embed]``). The
    # check below refuses to start if a stamped message differs from Celery's own in anything
    # but its ids, so a silent change cannot enqueue jobs no worker can read.
    def __init__(self) -> None:
        probe = make_celery("memory://")
        queue = queue_name(self._PROBE_MODEL)
        probe.send_task(RUN_JOB_TASK, args=[self._PLACEHOLDER], queue=queue)
        with probe.connection_for_write() as connection:
            message = connection.default_channel._get(queue)
        protocol = probe.conf.task_protocol
        probe.close()
        reference = copy.deepcopy(message)
        properties = message["properties"]
        args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
        # Refuse to start on a message layout this code does not know how to stamp.
        if (
            protocol != 2
            or message["headers"].get("task") != RUN_JOB_TASK
            or properties.get("body_encoding") != "base64"
            or message.get("content-type") != "application/json"
            or args != [self._PLACEHOLDER]
            or kwargs != {}
        ):
            raise RuntimeError(f"unexpected Celery message layout: {message!r}")

        # Serialize once with markers in the varying places; a job only fills them in. Every
        # value filled in is JSON-safe as is (uuids, base64, validated job ids and model names).
        markers = {
            "task_id": "\x00T",
            "tag": "\x00D",
            "args": "\x00A",
            "queue": "\x00Q",
            "body": "\x00B",
        }
        message["headers"].update(
            id=markers["task_id"], root_id=markers["task_id"], argsrepr=markers["args"]
        )
        properties.update(
            correlation_id=markers["task_id"],
            delivery_tag=markers["tag"],
            delivery_info={"exchange": "", "routing_key": markers["queue"]},
        )
        message["body"] = markers["body"]
        text = json.dumps(message)
        self._parts = text.replace("\\u0000", "\x00").split("\x00")
        self._body_halves = json.dumps([["\x00"], {}, embed]).split('"\\u0000"')

        self._verify(reference)

    def _verify(self, reference: dict[str, Any]) -> None:
        """Raise unless the message stamped for the probe job is Celery's own but for its ids."""
        _, text = self.build(self._PLACEHOLDER, self._PROBE_MODEL)
        stamped = json.loads(text)
        for message in (stamped, reference):
            message["headers"].update(id="", root_id="")
            message["properties"].update(correlation_id="", delivery_tag="")
        if stamped != reference:
            raise RuntimeError(
                f"the run_job message stamped here no longer matches what the installed Celery "
                f"sends: {stamped!r} != {reference!r}"
            )

    def build(self, job_id: str, model: str) -> tuple[str, str]:
        """The Redis list to push onto and the message (JSON text) that runs ``job_id``."""
        queue = queue_name(model)
        task_id = _uuid4()
        body = f'{self._body_halves[0]}"{job_id}"{self._body_halves[1]}'
        values = {
            "T": task_id,
            "D": _uuid4(),
            "A": f"['{job_id}']",
            "Q": queue,
            "B": base64.b64encode(body.encode()).decode(),
        }
        parts = self._parts
        out = [parts[0]]
        for part in parts[1:]:
            out.append(values[part[0]])
            out.append(part[1:])
        return queue, "".join(out)
