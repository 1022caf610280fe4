"""Model sources: an ``s3://`` prefix or single file is downloaded once into the model cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from masactrl_core.errors import ModelLoadError
from masactrl_jobs.catalog import ModelEntry, tiny_model_entry
from tests.conftest import S3Server
from worker.config import WorkerSettings
from worker.engine_loader import resolve_source, weights_dtype


def settings_for(s3: S3Server, cache: Path) -> WorkerSettings:
    return WorkerSettings(
        _env_file=None,
        environment="development",
        s3_endpoint_url=s3.endpoint_url,
        s3_access_key_id=s3.access_key,
        s3_secret_access_key=s3.secret_key,
        s3_region=s3.region,
        model_cache_dir=str(cache),
    )


def entry(source: str) -> ModelEntry:
    return ModelEntry.model_validate(tiny_model_entry(source))


def test_an_s3_model_is_downloaded_once(
    s3_server: S3Server, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    files = sorted(p for p in tiny_checkpoint.rglob("*") if p.is_file())
    for path in files:
        key = f"models/tiny-sd/{path.relative_to(tiny_checkpoint).as_posix()}"
        client.upload_file(str(path), s3_server.bucket, key)
    settings = settings_for(s3_server, tmp_path / "cache")
    source = f"s3://{s3_server.bucket}/models/tiny-sd"

    local = Path(resolve_source(entry(source), settings))
    assert local == (tmp_path / "cache" / "tiny").resolve()
    assert sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file()) == [
        p.relative_to(tiny_checkpoint) for p in files
    ]
    assert (local / "unet" / "config.json").read_bytes() == (
        tiny_checkpoint / "unet" / "config.json"
    ).read_bytes()

    client.delete_object(Bucket=s3_server.bucket, Key="models/tiny-sd/model_index.json")
    assert Path(resolve_source(entry(source), settings)) == local  # the cached copy


def test_an_s3_single_file_is_downloaded_once(s3_server: S3Server, tmp_path: Path) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    client.put_object(Bucket=s3_server.bucket, Key="models/anything.safetensors", Body=b"weights")
    settings = settings_for(s3_server, tmp_path / "cache")
    single = entry(f"s3://{s3_server.bucket}/models/anything.safetensors")
    assert single.single_file

    local = Path(resolve_source(single, settings))
    assert local == (tmp_path / "cache" / "tiny" / "anything.safetensors").resolve()
    assert local.read_bytes() == b"weights"
    assert not list(local.parent.glob("*.partial"))
    client.delete_object(Bucket=s3_server.bucket, Key="models/anything.safetensors")
    assert Path(resolve_source(single, settings)) == local  # the cached copy


def test_an_s3_prefix_without_a_model_is_refused(s3_server: S3Server, tmp_path: Path) -> None:
    settings = settings_for(s3_server, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        resolve_source(entry(f"s3://{s3_server.bucket}/models/nothing-here"), settings)
    assert not (tmp_path / "cache" / "tiny").exists()


def test_hub_ids_and_folders_pass_through(tmp_path: Path) -> None:
    settings = WorkerSettings(_env_file=None, environment="development")
    assert resolve_source(entry("stable-diffusion-v1-5/stable-diffusion-v1-5"), settings) == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_source(entry(str(tmp_path)), settings) == str(tmp_path)


def test_a_missing_local_source_is_refused_before_loading(tmp_path: Path) -> None:
    settings = WorkerSettings(_env_file=None, environment="development")
    with pytest.raises(ModelLoadError, match="model tiny: source .*/gone: no such folder or file"):
        resolve_source(entry(str(tmp_path / "gone")), settings)
    with pytest.raises(ModelLoadError, match="is a folder without model_index.json"):
        resolve_source(entry(str(tmp_path)), settings)


@pytest.mark.parametrize(
    ("configured", "family", "on_gpu", "expected"),
    [
        (None, "flux", True, "bfloat16"),  # FLUX.1 overflows float16
        (None, "sd", True, None),  # the engine's float16
        (None, "flux", False, None),  # float32 on the CPU
        ("float16", "flux", True, "float16"),  # the operator's choice wins
    ],
)
def test_the_weights_dtype_follows_the_setting_then_the_family_on_a_gpu(
    configured: str | None, family: str, on_gpu: bool, expected: str | None
) -> None:
    assert weights_dtype(configured, family, on_gpu=on_gpu) == expected


def test_an_offloaded_model_gives_the_same_images(tiny_flux_checkpoint: Path) -> None:
    """MASACTRL_OFFLOAD: diffusers' model CPU offload (here to the CPU itself, which runs the
    hooks and the execution device without a GPU) changes where weights rest, not the images."""
    import numpy as np

    from worker.engine_loader import load_engine

    entry = ModelEntry.model_validate(
        {"name": "flux", "source": str(tiny_flux_checkpoint), "family": "flux"}
    )
    images = []
    for offload in (False, True):
        settings = WorkerSettings(
            _env_file=None, environment="development", device="cpu", offload=offload
        )
        engine = load_engine(entry, settings, str(tiny_flux_checkpoint))
        # Offloaded: accelerate's hook sits on the transformer and moves it when it runs.
        assert hasattr(engine.pipeline.transformer, "_hf_hook") is offload
        result = engine.synthesize(
            "a photo of a cat", ["a photo of a dog"], seed=3, steps=2, width=32, height=32
        )
        images.append([np.asarray(image) for image in (result.source, *result.targets)])
    assert all(np.array_equal(a, b) for a, b in zip(*images, strict=True))
