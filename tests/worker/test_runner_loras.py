"""Single-file models and LoRA adapters in the GPU worker: JobRunner in-process on a tiny
single-file checkpoint with two tiny adapters, against a real Redis and a file store."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from masactrl_core import ControlConfig, MasaCtrlEngine
from masactrl_jobs.catalog import load_catalog
from masactrl_jobs.queue import make_celery
from masactrl_jobs.schema import JobKind, LoraInput
from masactrl_jobs.storage import FileStorage
from masactrl_jobs.store import JobStore
from tests.worker.helpers import tiny_catalog
from tests.worker.test_runner import create_job, job_error, photo_png, put_input
from worker.config import WorkerSettings
from worker.engine_loader import load_engine
from worker.inversion_cache import InversionCache, inversion_cache_key
from worker.outputs import png_bytes
from worker.runner import JobRunner
from worker.webhooks import Emitter

SYNTHESIS = dict(seed=7, steps=3, width=64, height=64, control=ControlConfig(1, 10))


def catalog(tiny_single_file: Any, tiny_loras: dict[str, Any]) -> str:
    """``tiny`` as a single file with its config folder, offering two adapters."""
    return tiny_catalog(
        tiny_single_file.file,
        config=str(tiny_single_file.config),
        loras={
            "style": {"source": str(tiny_loras["style"].file), "weight": 0.6},
            "pose": {"source": str(tiny_loras["pose"].path)},
        },
    )


@pytest.fixture()
def settings(
    redis_url: str, tmp_path: Path, tiny_single_file: Any, tiny_loras: dict[str, Any]
) -> WorkerSettings:
    return WorkerSettings(
        _env_file=None,
        environment="development",
        redis_url=redis_url,
        storage_url=(tmp_path / "storage").as_uri(),
        catalog=catalog(tiny_single_file, tiny_loras),
        progress_interval_seconds=0,
    )


@pytest.fixture(scope="module")
def engine(
    redis_server: Any,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_single_file: Any,
    tiny_loras: dict[str, Any],
) -> Any:
    """The worker's engine, loaded once from the single file the way the worker loads it."""
    settings = WorkerSettings(
        _env_file=None,
        environment="development",
        redis_url=redis_server.url,
        storage_url=tmp_path_factory.mktemp("storage").as_uri(),
        catalog=catalog(tiny_single_file, tiny_loras),
    )
    entry = load_catalog(settings).get("tiny")
    return load_engine(entry, settings, entry.source)


@pytest.fixture()
def runner(
    settings: WorkerSettings, store: JobStore, storage: FileStorage, engine: Any
) -> JobRunner:
    app = make_celery(settings.redis_url)
    return JobRunner(
        settings=settings,
        entry=load_catalog(settings).get("tiny"),
        engine=engine,
        store=store,
        storage=storage,
        app=app,
        emitter=Emitter(store, app, lambda record: {"id": record.id}),
        worker_id="test-worker",
        cache=InversionCache(storage, store, retention_seconds=3600, max_entries=100),
    )


def target_png(store: JobStore, storage: FileStorage, job_id: str) -> bytes:
    record = store.get(job_id)
    assert record is not None and record.output is not None, record
    return storage.get(record.output.images[1].key)


def test_jobs_with_and_without_adapters_equal_their_engine_runs(
    runner: JobRunner,
    store: JobStore,
    storage: FileStorage,
    tiny_checkpoint: Path,
    tiny_loras: dict[str, Any],
) -> None:
    styled = create_job(store, loras=[LoraInput(name="style", weight=0.6)])
    both = create_job(
        store, loras=[LoraInput(name="pose", weight=1.0), LoraInput(name="style", weight=-0.3)]
    )
    plain = create_job(store)
    for job_id in (styled, both, plain):
        assert runner.run(job_id) == "succeeded", job_error(store, job_id)
    assert runner.engine.loras.names == ["style", "pose"]  # each loaded once, on first use
    assert runner.engine.loras.active == {}

    # An engine of the diffusers folder the single file came from, with the same adapters.
    reference = MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")
    prompts = ("a photo of a cat", ["a photo of a dog"])
    expected_plain = reference.synthesize(*prompts, **SYNTHESIS)
    reference.loras.load("style", tiny_loras["style"].file)
    reference.loras.load("pose", tiny_loras["pose"].path)
    with reference.loras.activated({"style": 0.6}):
        expected_styled = reference.synthesize(*prompts, **SYNTHESIS)
    with reference.loras.activated({"pose": 1.0, "style": -0.3}):
        expected_both = reference.synthesize(*prompts, **SYNTHESIS)

    assert target_png(store, storage, styled) == png_bytes(expected_styled.targets[0])
    assert target_png(store, storage, both) == png_bytes(expected_both.targets[0])
    # The job without adapters after jobs with them: exactly the plain model's images.
    assert target_png(store, storage, plain) == png_bytes(expected_plain.targets[0])
    assert expected_plain.targets[0].tobytes() != expected_styled.targets[0].tobytes()


def test_an_inversion_is_cached_per_adapter_set(
    runner: JobRunner, store: JobStore, storage: FileStorage
) -> None:
    key = put_input(storage, photo_png())
    jobs = [
        create_job(store, JobKind.edit, image=key, loras=loras)
        for loras in (
            [],
            [LoraInput(name="style", weight=0.6)],
            [LoraInput(name="style", weight=0.9)],
            [LoraInput(name="style", weight=0.6)],
        )
    ]
    for job_id in jobs:
        assert runner.run(job_id) == "succeeded", job_error(store, job_id)
    seconds = [(store.get(job_id).metrics or {})["inversion_seconds"] for job_id in jobs]  # type: ignore[union-attr]
    assert all(s > 0 for s in seconds[:3]) and seconds[3] == 0  # the same adapters reuse it
    assert len(storage.list_prefix("cache/inversions/tiny/")) == 3
    # The reused inversion gives the images of the first run under the same adapters.
    assert target_png(store, storage, jobs[3]) == target_png(store, storage, jobs[1])
    image = Image.open(io.BytesIO(storage.get(key)))
    assert image.size == (64, 64)


def test_an_adapter_the_catalog_no_longer_lists_fails_the_job_as_invalid_input(
    runner: JobRunner, store: JobStore
) -> None:
    job_id = create_job(store, loras=[LoraInput(name="gone", weight=1.0)])
    assert runner.run(job_id) == "failed"
    error = job_error(store, job_id)
    assert (error.code, error.message) == (
        "invalid_input",
        "tiny has no LoRA adapter 'gone'; available: pose, style",
    )
    assert runner.run(create_job(store)) == "succeeded"  # the worker goes on


def test_cache_keys_differ_by_adapter_and_weight_but_not_order() -> None:
    def key(*loras: tuple[str, str, float]) -> str:
        return inversion_cache_key("sha", "tiny", 64, 64, 3, "a cat", loras)

    plain = key()
    assert plain == inversion_cache_key("sha", "tiny", 64, 64, 3, "a cat")
    style, pose = ("style", "/l/style.safetensors", 0.6), ("pose", "/l/pose", 1.0)
    keys = {plain, key(style), key(("style", "/l/style.safetensors", 0.7)), key(pose)}
    keys |= {key(style, pose), key(("style", "/other.safetensors", 0.6))}
    assert len(keys) == 6
    assert key(style, pose) == key(pose, style)  # adapters add up: their order is irrelevant
    assert all(k.startswith("cache/inversions/tiny/") for k in keys)


def test_single_file_entries_are_loaded_from_the_file(
    engine: Any, settings: WorkerSettings, tiny_single_file: Any
) -> None:
    assert load_catalog(settings).get("tiny").single_file
    assert engine.model_name == "tiny" and engine.family == "sd" and engine.block_count == 16
