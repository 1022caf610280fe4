"""JobRunner with sequence jobs: frames equal ``engine.sequence`` run directly, plus animations."""

# The runner fixtures are the conditions tests' (imported below); pytest passes them by name.
# ruff: noqa: F811

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from masactrl_core import ControlConfig
from masactrl_core.canny import canny
from masactrl_core.conditions import Condition
from masactrl_jobs import media
from masactrl_jobs.media import VideoBudget, decode_video, encode_mp4, probe_video
from masactrl_jobs.schema import ConditionInput, JobKind
from masactrl_jobs.storage import FileStorage
from masactrl_jobs.store import JobStore
from tests.masactrl_jobs.test_media import webp_facts
from tests.videos import blank_video
from tests.worker.test_runner import create_job, job_error, photo_png, put_input
from tests.worker.test_runner_conditions import (  # noqa: F401 (fixtures)
    controlnet,
    make_runner,
    settings,
)
from worker.outputs import png_bytes
from worker.runner import JobRunner

BUDGET = VideoBudget.defaults(120)  # the settings' default budget, the engine's frame limit

CONTROL = ControlConfig(start_step=1, start_layer=10)


def _layouts(count: int = 3) -> list[Image.Image]:
    # Different sizes: the engine fits each one to the output size.
    return [Image.effect_noise((64 + 8 * k, 64), 30 + 20 * k).convert("RGB") for k in range(count)]


def _outputs(store: JobStore, job_id: str) -> list[tuple[str, str]]:
    record = store.get(job_id)
    assert record is not None and record.output is not None, record
    return [(image.role.value, image.key.rsplit("/", 1)[-1]) for image in record.output.images]


def test_a_sequence_job_equals_engine_sequence_with_frames_in_order(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    tiny_engine: Any,
) -> None:
    layouts = _layouts()
    keys = [put_input(storage, png_bytes(image)) for image in layouts]
    job_id = create_job(
        store,
        JobKind.sequence,
        target_prompts=["a photo of a dog"],
        condition=ConditionInput(model="canny", images=keys, scale=0.8),
        animation_fps=5.0,
    )
    runner = make_runner()
    assert runner.run(job_id) == "succeeded"

    expected = tiny_engine.sequence(
        "a photo of a cat",
        "a photo of a dog",
        Condition(runner.conditions.get("canny"), layouts, scale=0.8),
        seed=7,
        steps=3,
        width=64,
        height=64,
        control=CONTROL,
    )
    assert _outputs(store, job_id) == [
        ("source", "source_0.png"),
        ("frame", "frame_0.png"),
        ("frame", "frame_1.png"),
        ("frame", "frame_2.png"),
        ("animation", "sequence.mp4"),
        ("animation", "sequence.webp"),
    ]
    prefix = f"results/{job_id}/"
    assert storage.get(prefix + "source_0.png") == png_bytes(expected.source)
    frames = [storage.get(f"{prefix}frame_{k}.png") for k in range(3)]
    assert frames == [png_bytes(frame) for frame in expected.frames]

    video = storage.get(prefix + "sequence.mp4")
    info = probe_video(video)
    assert (info.frame_count, round(info.fps), info.size) == (3, 5, (64, 64))
    assert webp_facts(storage.get(prefix + "sequence.webp")) == (3, [200, 200, 200])

    record = store.get(job_id)
    assert record is not None and record.progress is not None
    assert record.progress.frames_done == 3 and record.progress.step == 3
    metrics = record.metrics or {}
    assert metrics["unet_image_evals"] == expected.stats.unet_image_evals
    assert metrics["condition_evals"] == expected.stats.condition_evals == 3 * 2 * 3


def test_a_video_sequence_from_a_photo_decodes_samples_and_applies_canny(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    tiny_engine: Any,
) -> None:
    video = encode_mp4([image.resize((64, 64)) for image in _layouts(4)], 4.0)
    video_key = "inputs/clip.video"
    storage.put(video_key, video)
    photo = photo_png()
    photo_key = put_input(storage, photo)
    condition = ConditionInput(
        model="canny", images=[], video=video_key, fps=2.0, max_frames=2, preprocess="canny"
    )
    job_id = create_job(
        store,
        JobKind.sequence,
        image=photo_key,
        target_prompts=["a photo of a dog"],
        condition=condition,
        anchor_source=True,
    )
    runner = make_runner()
    assert runner.run(job_id) == "succeeded"

    layouts = [canny(frame) for frame in decode_video(video, budget=BUDGET, fps=2.0, max_frames=2)]
    expected = tiny_engine.sequence(
        "a photo of a cat",
        "a photo of a dog",
        Condition(runner.conditions.get("canny"), layouts),
        image=Image.open(io.BytesIO(photo)).convert("RGB"),
        anchor_source=True,
        seed=7,
        steps=3,
        width=64,
        height=64,
        control=CONTROL,
    )
    prefix = f"results/{job_id}/"
    frames = [storage.get(f"{prefix}frame_{k}.png") for k in range(2)]
    assert frames == [png_bytes(frame) for frame in expected.frames]
    # The image source's inversion went to the cache, as for edits.
    assert storage.list_prefix("cache/inversions/tiny/")


def test_an_unreadable_video_fails_the_job_as_invalid_input(
    make_runner: Callable[..., JobRunner], store: JobStore, storage: FileStorage
) -> None:
    storage.put("inputs/broken.video", b"not a video at all")
    condition = ConditionInput(model="canny", images=[], video="inputs/broken.video")
    job_id = create_job(store, JobKind.sequence, condition=condition)
    assert make_runner().run(job_id) == "failed"
    error = job_error(store, job_id)
    assert error.code == "invalid_input" and "cannot be read as a video" in error.message
    assert storage.list_prefix(f"results/{job_id}/") == []


def test_a_video_over_the_budget_fails_the_job_before_a_frame_is_decoded(
    make_runner: Callable[..., JobRunner],
    store: JobStore,
    storage: FileStorage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stored directly, as if the gateway had been bypassed: 24 frames of 4096×4096 (50 KB, 1.2 GB
    # decoded), with the max_frames the schema's type allows.
    storage.put("inputs/bomb.video", blank_video(4096, 4096, 24, "h264"))
    condition = ConditionInput(model="canny", images=[], video="inputs/bomb.video", max_frames=1000)
    job_id = create_job(store, JobKind.sequence, condition=condition)

    def decoded(*args: Any) -> Any:
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(media, "_decoded", decoded)
    assert make_runner().run(job_id) == "failed"
    error = job_error(store, job_id)
    assert error.code == "invalid_input", error
    assert error.message == (
        "the video's 24 frames of 4096×4096 are 402,653,184 pixels decoded; the limit is "
        "134,217,728"
    )
    assert storage.list_prefix(f"results/{job_id}/") == []


def test_sequence_previews_show_the_source_then_every_frame_and_go_with_success(
    settings: Any, store: JobStore, storage: FileStorage, tiny_engine: Any
) -> None:
    from masactrl_jobs.catalog import load_catalog
    from masactrl_jobs.queue import make_celery
    from worker.webhooks import Emitter

    # The model's VAE decodes (the catalog names no preview_vae): every step here, with time
    # between steps so that no preview is dropped while the one before is being stored.
    settings = settings.model_copy(
        update={
            "preview_vae_every_steps": 1,
            "preview_min_interval_seconds": 0.0,
            "step_delay_seconds": 0.3,
        }
    )
    app = make_celery(settings.redis_url)
    runner = JobRunner(
        settings=settings,
        entry=load_catalog(settings).get("tiny"),
        engine=tiny_engine,
        store=store,
        storage=storage,
        app=app,
        emitter=Emitter(store, app, lambda record: {"id": record.id}),
        worker_id="test-worker",
    )
    keys = [put_input(storage, png_bytes(image)) for image in _layouts()]
    job_id = create_job(
        store,
        JobKind.sequence,
        target_prompts=["a photo of a dog"],
        condition=ConditionInput(model="canny", images=keys),
        previews=True,
    )
    assert runner.run(job_id) == "succeeded"
    previews = [e.data for e in store.read_events(job_id) if e.event == "preview"]
    # Steps 1 and 2 of 3 (never the last), each with the source and the three frames.
    assert [(p["step"], p["steps"]) for p in previews] == [(1, 3), (2, 3)]
    for preview in previews:
        assert [(i["role"], i["index"]) for i in preview["images"]] == [
            ("source", 0),
            ("frame", 0),
            ("frame", 1),
            ("frame", 2),
        ]
        assert preview["images"][3]["key"] == (
            f"results/{job_id}/previews/{preview['step']}/frame_2.webp"
        )
    # The results replace them.
    assert storage.list_prefix(f"results/{job_id}/previews/") == []
    assert len(storage.list_prefix(f"results/{job_id}/")) == 6
