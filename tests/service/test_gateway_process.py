"""A real gateway process under uvicorn: memory under concurrent oversized uploads, and what its
logs hold."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from masactrl_jobs.store import JobStore
from tests.conftest import free_port
from tests.images import png_bytes
from tests.service.conftest import SIGNING_SECRET, SYNTHESIS, bearer

REPO = Path(__file__).resolve().parents[2]
KEY = "process-test-key-1f2e3d"
MiB = 1024 * 1024


@dataclass
class GatewayProcess:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    storage: Path

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss


@pytest.fixture()
def gateway(redis_url: str, tmp_path: Path) -> Iterator[GatewayProcess]:
    port = free_port()
    storage = tmp_path / "storage"
    log = tmp_path / "gateway.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO),
        "MASACTRL_ENVIRONMENT": "development",
        "MASACTRL_DEV_API_KEY": KEY,
        "MASACTRL_REDIS_URL": redis_url,
        "MASACTRL_STORAGE_URL": storage.as_uri(),
        "MASACTRL_URL_SIGNING_SECRET": SIGNING_SECRET,
        "MASACTRL_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "MASACTRL_CLEANUP_INTERVAL_SECONDS": "0",
    }
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "service.main:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/livez", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.2)
        yield GatewayProcess(url, port, process, log, storage)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _chunked_upload(port: int, path: str, head: bytes, total: int, statuses: list[int]) -> None:
    """POST a chunked body of ``total`` bytes that starts with ``head``; record the status."""
    chunk = b"A" * MiB
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        sent = 0
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
            sent += len(head)
            while sent < total:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the gateway answered and closed without reading the rest: as intended
        try:
            reply = sock.recv(65536)
        except OSError:
            reply = b""
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
        statuses.append(status)
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("path", "head"),
    [
        # Valid JSON up to the padding: nothing but the size is wrong with it.
        (
            "/v1/syntheses",
            b'{"source_prompt": "a cat", "target_prompts": ["x"], "negative_prompt": "',
        ),
        # An inline image: the body earns one image's allowance, and no more.
        ("/v1/edits", b'{"target_prompts": ["x"], "image": "data:image/png;base64,'),
    ],
)
def test_concurrent_oversized_bodies_keep_memory_bounded(
    gateway: GatewayProcess, path: str, head: bytes
) -> None:
    # Warm up the code paths a real submission takes, so they do not count as growth.
    warm = httpx.post(f"{gateway.url}/v1/syntheses", json=SYNTHESIS, headers=bearer(KEY))
    assert warm.status_code == 202, warm.text
    baseline = gateway.rss()
    peak = baseline
    statuses: list[int] = []
    threads = [
        threading.Thread(
            target=_chunked_upload, args=(gateway.port, path, head, 40 * MiB, statuses)
        )
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, gateway.rss())
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    assert peak - baseline < 150 * MiB, f"grew by {(peak - baseline) / MiB:.0f} MiB"
    assert len(statuses) == 8
    # Every body is refused, by size (413) or for want of an upload slot (503); 0 means the
    # connection closed before the answer could be read, never an acceptance.
    assert set(statuses) <= {413, 503, 0}, statuses
    assert 413 in statuses
    assert httpx.get(f"{gateway.url}/livez").status_code == 200


def test_access_log_holds_no_signatures(gateway: GatewayProcess, redis_url: str) -> None:
    response = httpx.post(f"{gateway.url}/v1/syntheses", json=SYNTHESIS, headers=bearer(KEY))
    job_id = response.json()["id"]
    key = f"results/{job_id}/source_0.png"
    (gateway.storage / key).parent.mkdir(parents=True, exist_ok=True)
    (gateway.storage / key).write_bytes(png_bytes(8, 8))
    store = JobStore.from_url(redis_url)
    try:
        store.start(job_id, "fake-worker")
        image = {"role": "source", "prompt": "a cat", "key": key, "width": 8, "height": 8}
        store.succeed(job_id, [image])
    finally:
        store.close()
    job = httpx.get(f"{gateway.url}/v1/jobs/{job_id}", headers=bearer(KEY)).json()
    url = job["output"]["images"][0]["url"]
    signature = httpx.URL(url).params["signature"]
    assert httpx.get(url).status_code == 200
    # The server decodes query names, so a percent-encoded name downloads the file as well.
    encoded = url.replace("signature=", "%73ignature=")
    assert httpx.get(encoded).status_code == 200
    time.sleep(0.5)  # let the access log lines reach the file
    text = gateway.log.read_text()
    assert f"/v1/files/{key}" in text  # the downloads were logged...
    assert "&signature=REDACTED" in text and "&%73ignature=REDACTED" in text
    assert signature not in text  # ...without their bearer signature
