"""The runner dispatches through the kinds' registry: a job runs its registered kind's handlers.

The kinds' own runs are tested with the tiny engine (test_runner.py, test_runner_sequences.py,
...) and against fakes (tests/masactrl_jobs/test_kinds.py); here a spy kind registered under each
``JobKind`` shows that the runner's one path loads, runs and stores what that kind says, inside
the exactly-once protocol, with no engine at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from masactrl_jobs.catalog import ModelEntry, tiny_model_entry
from masactrl_jobs.kinds import KINDS
from masactrl_jobs.kinds.base import ImageOutput, JobInputError, Output, Ran, Source
from masactrl_jobs.queue import make_celery
from masactrl_jobs.schema import ControlInput, ErrorCode, ImageRole, JobInput, JobKind, JobStatus
from masactrl_jobs.store import JobStore
from tests.worker.helpers import tiny_catalog
from worker.config import WorkerSettings
from worker.runner import JobRunner
from worker.webhooks import Emitter

STATS = SimpleNamespace(
    inversion_seconds=0.0,
    denoise_seconds=0.0,
    unet_image_evals=0,
    condition_evals=0,
    peak_memory_bytes=None,
)


@dataclass
class SpyKind:
    """A kind whose run needs no engine: it records its calls and returns one small image."""

    kind: JobKind
    fail: bool = False
    calls: list[str] = field(default_factory=list)
    preview_role = ImageRole.target

    def load(self, ctx: Any) -> Source:
        self.calls.append("load")
        return Source()

    def run(self, ctx: Any, source: Source) -> Ran:
        self.calls.append("run")
        if self.fail:
            raise JobInputError("the spy's input is broken")
        assert ctx.input.source_prompt == "a cat"
        return Ran(SimpleNamespace(stats=STATS), 0.0)

    def outputs(self, job: JobInput, ran: Ran) -> list[Output]:
        self.calls.append("outputs")
        return [ImageOutput(ImageRole.source, 0, job.source_prompt, Image.new("RGB", (8, 8)))]


@pytest.fixture()
def settings(redis_url: str, tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        _env_file=None,
        environment="development",
        redis_url=redis_url,
        storage_url=(tmp_path / "storage").as_uri(),
        catalog=tiny_catalog(tmp_path / "unused"),
    )


def _runner(settings: WorkerSettings, store: JobStore, storage: Any) -> JobRunner:
    app = make_celery(settings.redis_url)
    return JobRunner(
        settings=settings,
        entry=ModelEntry.model_validate(tiny_model_entry("unused")),
        # A spy kind never runs it; the runner asks it only about the prompts.
        engine=SimpleNamespace(prompt_warnings=lambda prompts: []),  # type: ignore[arg-type]
        store=store,
        storage=storage,
        app=app,
        emitter=Emitter(store, app, lambda record: {"id": record.id}),
        worker_id="test-worker",
    )


def _create(store: JobStore, kind: JobKind) -> str:
    result = store.create(
        tenant="acme",
        kind=kind,
        model="tiny",
        input=JobInput(
            source_prompt="a cat",
            target_prompts=["a dog"],
            seed=7,
            steps=3,
            guidance_scale=7.5,
            width=64,
            height=64,
            control=ControlInput(start_step=1, start_layer=10),
        ),
    )
    assert result.job_id is not None
    return result.job_id


@pytest.mark.parametrize("job_kind", list(JobKind))
def test_a_job_runs_the_handlers_registered_for_its_kind(
    job_kind: JobKind,
    settings: WorkerSettings,
    store: JobStore,
    storage: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spies = {kind: SpyKind(kind) for kind in JobKind}
    for kind, spy in spies.items():
        monkeypatch.setitem(KINDS, kind, spy)  # type: ignore[arg-type]
    job_id = _create(store, job_kind)
    assert _runner(settings, store, storage).run(job_id) == "succeeded"
    assert spies.pop(job_kind).calls == ["load", "run", "outputs"]
    assert all(not spy.calls for spy in spies.values())
    record = store.get(job_id)
    assert record is not None and record.status is JobStatus.succeeded
    assert record.output is not None
    assert [image.key for image in record.output.images] == [f"results/{job_id}/source_0.png"]


def test_a_kinds_input_error_fails_the_job_with_invalid_input(
    settings: WorkerSettings, store: JobStore, storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(KINDS, JobKind.synthesis, SpyKind(JobKind.synthesis, fail=True))  # type: ignore[arg-type]
    job_id = _create(store, JobKind.synthesis)
    assert _runner(settings, store, storage).run(job_id) == "failed"
    record = store.get(job_id)
    assert record is not None and record.error is not None
    assert record.error.code == ErrorCode.invalid_input.value
    assert record.error.message == "the spy's input is broken"
