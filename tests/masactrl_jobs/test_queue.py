"""The run_job message the store pushes is checked against the installed Celery at start-up."""

from __future__ import annotations

import json

import pytest

from masactrl_jobs.queue import TaskMessages


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
