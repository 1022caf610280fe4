"""The run_job message the store pushes is checked against the installed Celery at start-up."""

from __future__ import annotations

import json

import pytest

from masactrl_jobs.queue import RUN_JOB_TASK, TaskMessages, broker_of, make_celery, queue_name
from masactrl_jobs.settings import CommonSettings, load_settings
from masactrl_jobs.store.connection import RedisTarget
from tests.sentinel_cluster import SentinelCluster


def test_the_self_check_passes_on_the_installed_celery() -> None:
    queue, text = TaskMessages().build("01960000-0000-7000-8000-000000000000", "tiny")
    message = json.loads(text)
    assert queue == "masactrl.tiny"
    assert message["properties"]["delivery_info"]["routing_key"] == queue


def test_the_self_check_refuses_a_message_celery_would_not_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    build = TaskMessages.build

    def drifted(self: TaskMessages, job_id: str, model: str) -> tuple[str, str]:
        queue, text = build(self, job_id, model)
        message = json.loads(text)
        message["headers"]["retries"] = 1  # as if a Celery upgrade changed a header
        return queue, json.dumps(message)

    monkeypatch.setattr(TaskMessages, "build", drifted)
    with pytest.raises(RuntimeError, match="no longer matches"):
        TaskMessages()


def test_a_sentinel_target_becomes_kombus_sentinel_broker() -> None:
    target = RedisTarget(
        "redis://user:p%40ss@ignored:6379/2",
        sentinels=(("s0", 26379), ("s1", 26380)),
        sentinel_master="masactrl",
        sentinel_password="sentinel-secret",
    )
    url, options = broker_of(target)
    assert url == "sentinel://user:p%40ss@s0:26379/2;sentinel://user:p%40ss@s1:26380/2"
    assert options == {
        "master_name": "masactrl",
        "sentinel_kwargs": {"password": "sentinel-secret"},
    }
    app = make_celery(target, visibility_timeout=60)
    transport = app.conf.broker_transport_options
    assert transport["master_name"] == "masactrl" and transport["visibility_timeout"] == 60
    # The sentinels themselves get the password and the timeouts, never the master's password.
    assert transport["sentinel_kwargs"] == {
        "password": "sentinel-secret",
        "socket_connect_timeout": 2.0,
        "socket_timeout": 10.0,
    }
    assert broker_of(RedisTarget("redis://h:6379/0")) == ("redis://h:6379/0", {})


@pytest.mark.parametrize("sentinel_cluster", [None, "a-redis-password"], indirect=True)
def test_celery_publishes_to_the_master_sentinel_names(sentinel_cluster: SentinelCluster) -> None:
    settings = load_settings(CommonSettings, _env_file=None, environment="development")
    app = make_celery(settings.redis_target)
    try:
        app.send_task(RUN_JOB_TASK, args=["job-1"], queue=queue_name("sd15"))
    finally:
        app.close()
    master = sentinel_cluster.data_client(sentinel_cluster.master_port())
    try:
        assert master.llen(queue_name("sd15")) == 1
    finally:
        master.close()
