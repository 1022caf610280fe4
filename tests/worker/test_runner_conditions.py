"""JobRunner with layout conditions and anchored edits: the engine's images, cache included."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from masactrl_core import ControlConfig
from masactrl_core.canny import canny
from masactrl_core.conditions import Condition
from masactrl_jobs.catalog import load_catalog
from masactrl_jobs.queue import make_celery
from masactrl_jobs.schema import ConditionInput, JobKind
from masactrl_jobs.storage import FileStorage
from masactrl_jobs.store import JobStore
from tests.worker.helpers import tiny_catalog
from tests.worker.test_runner import create_job, job_error, photo_png, put_input
from worker.config import WorkerSettings
from worker.inversion_cache import InversionCache
from worker.outputs import png_bytes
from worker.runner import JobRunner
from worker.webhooks import Emitter


@pytest.fixture(scope="module")
def controlnet(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from masactrl_core.tiny_conditions import write_tiny_condition_model

    out = tmp_path_factory.mktemp("controlnet") / "canny"
    return write_tiny_condition_model(out, kind="controlnet", base=tiny_checkpoint, seed=3)


@pytest.fixture()
def settings(
    redis_url: str, tmp_path: Path, tiny_checkpoint: Path, controlnet: Path
) -> WorkerSettings:
    conditions = {"canny": {"source": str(controlnet), "kind": "controlnet"}}
    return WorkerSettings(
        _env_file=None,
        environment="development",
        redis_url=redis_url,
        storage_url=(tmp_path / "storage").as_uri(),
        catalog=tiny_catalog(tiny_checkpoint, conditions=conditions),
        # Long enough that loading the condition model on a busy test machine keeps the lease.
        recovery_seconds=30,
        storage_retry_attempts=2,
        storage_retry_max_wait_seconds=0.05,
        progress_interval_seconds=0,
        webhook_progress_interval_seconds=0,
    )


@pytest.fixture()
def make_runner(
    settings: WorkerSettings, store: JobStore, storage: FileStorage, tiny_engine: Any
) -> Callable[[], JobRunner]:
    def make() -> JobRunner:
        app = make_celery(settings.redis_url)
        return JobRunner(
            settings=settings,
            entry=load_catalog(settings).get("tiny"),
            engine=tiny_engine,
            store=store,
            storage=storage,
            app=app,
            emitter=Emitter(store, app, lambda record: {"id": record.id}),
            worker_id="test-worker",
            cache=InversionCache(storage, store, retention_seconds=3600, max_entries=100),
        )

    return make


def _photo(storage: FileStorage) -> tuple[str, Image.Image]:
    data = photo_png()
    return put_input(storage, data), Image.open(io.BytesIO(data)).convert("RGB")


def _output(store: JobStore, storage: FileStorage, job_id: str) -> list[bytes]:
    record = store.get(job_id)
    assert record is not None and record.output is not None, record
    return [storage.get(image.key) for image in record.output.images]


def test_a_conditioned_edit_equals_the_engine_with_canny_applied(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    tiny_engine: Any,
    controlnet: Path,
) -> None:
    key, photo = _photo(storage)
    condition = ConditionInput(
        model="canny", images=[key], scale=0.7, start=0.0, end=0.7, preprocess="canny"
    )
    runner = make_runner()
    job_id = create_job(
        store, JobKind.edit, image=key, target_prompts=["a dog", "a cat"], condition=condition
    )
    assert runner.run(job_id) == "succeeded"
    model = runner.conditions.get("canny")
    assert runner.conditions.get("canny") is model  # kept warm, not loaded per job

    expected = tiny_engine.edit(
        photo,
        ["a dog", "a cat"],
        source_prompt="a photo of a cat",
        seed=7,
        steps=3,
        width=64,
        height=64,
        control=ControlConfig(start_step=1, start_layer=10),
        condition=Condition(model, [canny(photo)], scale=0.7, start=0.0, end=0.7),
    )
    source, *targets, edges = _output(store, storage, job_id)
    assert targets == [png_bytes(image) for image in expected.targets]
    # The published condition image is the edge map the ControlNet received.
    assert edges == png_bytes(canny(photo))
    record = store.get(job_id)
    assert record is not None and record.output is not None
    assert [(i.role.value, i.key.rsplit("/", 1)[-1]) for i in record.output.images][-1] == (
        "condition",
        "condition_0.png",
    )
    metrics = store.get(job_id).metrics or {}  # type: ignore[union-attr]
    assert metrics["condition_evals"] == expected.stats.condition_evals > 0


def test_an_anchored_edit_from_the_cache_equals_the_engine(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    tiny_engine: Any,
) -> None:
    key, photo = _photo(storage)
    runner = make_runner()
    first = create_job(store, JobKind.edit, image=key, target_prompts=["a dog"])
    anchored = create_job(
        store, JobKind.edit, image=key, target_prompts=["a red car"], anchor_source=True
    )
    assert runner.run(first) == "succeeded"
    assert runner.run(anchored) == "succeeded"
    metrics = store.get(anchored).metrics or {}  # type: ignore[union-attr]
    assert metrics["inversion_seconds"] == 0  # the trajectory came from the cache

    expected = tiny_engine.edit(
        photo,
        ["a red car"],
        source_prompt="a photo of a cat",
        seed=7,
        steps=3,
        width=64,
        height=64,
        control=ControlConfig(start_step=1, start_layer=10),
        anchor_source=True,
    )
    assert _output(store, storage, anchored) == [
        png_bytes(expected.source),
        png_bytes(expected.targets[0]),
    ]


def test_a_cached_inversion_without_trajectory_is_redone_for_an_anchored_edit(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    tiny_engine: Any,
) -> None:
    from masactrl_core import InvertedImage

    key, photo = _photo(storage)
    runner = make_runner()
    assert runner.run(create_job(store, JobKind.edit, image=key)) == "succeeded"
    [cached] = storage.list_prefix("cache/inversions/tiny/")
    old = InvertedImage.from_safetensors_bytes(storage.get(cached)).without_trajectory()
    storage.put(cached, old.to_safetensors_bytes(), "application/octet-stream")

    anchored = create_job(store, JobKind.edit, image=key, anchor_source=True)
    assert runner.run(anchored) == "succeeded"
    assert (store.get(anchored).metrics or {})["inversion_seconds"] > 0  # type: ignore[union-attr]
    fresh = InvertedImage.from_safetensors_bytes(storage.get(cached))
    assert fresh.has_trajectory


def test_a_condition_this_workers_catalog_lacks_is_invalid_input(
    make_runner: Callable[..., JobRunner], store: JobStore, storage: FileStorage
) -> None:
    key, _ = _photo(storage)
    condition = ConditionInput(model="depth", images=[key])
    job_id = create_job(store, condition=condition)
    assert make_runner().run(job_id) == "failed"
    error = job_error(store, job_id)
    assert error.code == "invalid_input"
    assert error.message == "tiny has no condition model 'depth'; available: canny"
