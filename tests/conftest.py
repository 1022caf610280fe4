"""Fixtures every test package shares: an environment free of the developer's settings, real
servers on free loopback ports (never the shared ones) and tiny checkpoints."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MASACTRL_* variable or .env file from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("MASACTRL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class RedisServer:
    port: int
    data_dir: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, appendonly: bool = True) -> None:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes" if appendonly else "no",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server with AOF persistence, as in docker-compose."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing: `make test` installs it (Debian: redis-server)")
    server = RedisServer(port=free_port(), data_dir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database on the session's Redis for each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture()
def sentinel_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """A private Sentinel-managed Redis (1 primary, 1 replica, 3 sentinels; see
    tests/sentinel_cluster.py), with ``MASACTRL_REDIS_*`` set to reach it through the sentinels.

    Parametrize it indirectly with a password to have every node and sentinel require one.
    """
    from tests.sentinel_cluster import SentinelCluster

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing: `make test` installs it (Debian: redis-server)")
    password = getattr(request, "param", None)
    cluster = SentinelCluster(tmp_path / "sentinel-cluster", password=password)
    cluster.workdir.mkdir()
    try:
        cluster.start()
        for name, value in cluster.environment().items():
            monkeypatch.setenv(name, value)
        yield cluster
    finally:
        cluster.stop()


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str = "masactrl-test"
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's standalone S3-protocol server on a free loopback port, with one bucket."""
    import boto3

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        server = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
        boto3.client(
            "s3",
            endpoint_url=server.endpoint_url,
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            region_name=server.region,
        ).create_bucket(Bucket=server.bucket)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- tiny checkpoints, shared by the engine and CLI tests ------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-family checkpoint (seed 0, native 64x64), written once per test session."""
    from masactrl_core.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


# The words ``tiny_vocabulary_checkpoint`` declares it knows.
TINY_VOCABULARY = ("a", "photo", "of", "cat", "dog")


@pytest.fixture(scope="session")
def tiny_vocabulary_checkpoint(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny checkpoint declaring a closed vocabulary (``TINY_VOCABULARY``) in its
    ``masactrl.json``, as the toy model does: prompts with other words get warnings."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("tiny-vocabulary") / "model"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "masactrl.json").write_text(json.dumps({"vocabulary": list(TINY_VOCABULARY)}))
    return folder


@pytest.fixture(scope="session")
def tiny_shaped_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SD-family checkpoints shaped unlike SD 1.5 (``masactrl_core.tiny.SD_VARIANTS``:
    7 blocks on two levels, 9 without a mid block, 11 on three levels), by variant name."""
    from masactrl_core.tiny import SD_VARIANTS, write_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny-shapes")
    return {
        variant: write_tiny_checkpoint(folder / variant, seed=0, variant=variant)
        for variant in SD_VARIANTS
        if variant != "standard"
    }


@dataclass(frozen=True)
class TinySingleFile:
    """The tiny checkpoint as one original-layout file, and a config folder without weights."""

    file: Path
    config: Path


@pytest.fixture(scope="session")
def tiny_single_file(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``tiny_checkpoint`` written as ``tiny.safetensors`` plus its weightless config folder."""
    from masactrl_core.tiny_single_file import write_config_folder, write_single_file

    folder = tmp_path_factory.mktemp("tiny-single-file")
    return TinySingleFile(
        write_single_file(tiny_checkpoint, folder / "tiny.safetensors"),
        write_config_folder(tiny_checkpoint, folder / "config"),
    )


@pytest.fixture(scope="session")
def tiny_loras(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two seeded random LoRAs for ``tiny_checkpoint``: ``style`` (UNet and text encoder) and
    ``pose`` (UNet only), as ``TinyLoraInfo`` by name."""
    from masactrl_core.tiny_lora import write_tiny_lora

    folder = tmp_path_factory.mktemp("tiny-loras")
    return {
        "style": write_tiny_lora(tiny_checkpoint, folder / "style", seed=1),
        "pose": write_tiny_lora(tiny_checkpoint, folder / "pose", seed=2, text_encoder=False),
    }


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL-family checkpoint (seed 0, native 64x64, 70 blocks), written once per session."""
    from masactrl_core.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sdxl") / "model", family="sdxl")


@pytest.fixture(scope="session")
def tiny_flux_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX checkpoint (seed 0; 2 double- and 2 single-stream blocks, guidance-distilled,
    16-channel VAE of factor 2), written once per session."""
    from masactrl_core.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-flux") / "model", family="flux")


@pytest.fixture(scope="session")
def tiny_preview_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny AutoencoderTiny (seed 0) that decodes both tiny checkpoints' live previews, in a
    sibling folder of theirs, as a catalog's ``preview_vae`` names it."""
    from masactrl_core.tiny import write_tiny_preview_vae

    return write_tiny_preview_vae(tmp_path_factory.mktemp("tiny-preview-vae") / "model", seed=0)
