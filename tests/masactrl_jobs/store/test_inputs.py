"""Registering inputs for sweeping before they are stored, on a real redis-server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from masactrl_jobs.schema import ControlInput, JobInput, JobKind
from masactrl_jobs.store import JobStore

RETENTION = 3600


@pytest.fixture()
def store(redis_url: str) -> Iterator[JobStore]:
    s = JobStore.from_url(redis_url, retention_seconds=RETENTION)
    yield s
    s.close()


def test_registered_inputs_are_swept_after_retention(store: JobStore) -> None:
    now = time.time()
    assert store.register_inputs(["inputs/a.png", "inputs/b.png", "inputs/a.png"], now=now) == 2
    assert store.redis.zscore(store.keys.inputs, "inputs/a.png") == pytest.approx(now + RETENTION)
    assert store.expired_inputs(now=now + RETENTION - 1) == []
    due = store.expired_inputs(now=now + RETENTION)
    assert sorted(due) == ["inputs/a.png", "inputs/b.png"]
    assert sorted(store.forget_inputs(due, now=now + RETENTION)) == due


def test_registering_never_shortens_a_later_removal(store: JobStore) -> None:
    now = time.time()
    store.register_inputs(["inputs/a.png"], now=now + 100)
    store.register_inputs(["inputs/a.png"], now=now)
    assert store.redis.zscore(store.keys.inputs, "inputs/a.png") == pytest.approx(
        now + 100 + RETENTION
    )
    store.register_inputs(["inputs/a.png"], now=now + 200)
    assert store.redis.zscore(store.keys.inputs, "inputs/a.png") == pytest.approx(
        now + 200 + RETENTION
    )


def test_a_job_created_later_keeps_a_registered_input(store: JobStore) -> None:
    now = time.time()
    store.register_inputs(["inputs/a.png"], now=now)
    job_input = JobInput(
        source_prompt="",
        target_prompts=["a dog"],
        seed=1,
        steps=10,
        guidance_scale=7.5,
        width=512,
        height=512,
        image="inputs/a.png",
        control=ControlInput(start_step=4, start_layer=10),
    )
    store.create(tenant="acme", kind=JobKind.edit, model="sd15", input=job_input, now=now + 50)
    assert store.expired_inputs(now=now + RETENTION) == []
    assert store.expired_inputs(now=now + 50 + RETENTION) == ["inputs/a.png"]


def test_registering_nothing_sends_nothing(store: JobStore) -> None:
    assert store.register_inputs([]) == 0
