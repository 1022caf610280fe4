"""Service overhead end to end: gateway + GPU worker + webhook worker on the tiny checkpoint.

    .venv/bin/python bench/service.py [--jobs 50] [--steps 2] [--storage file|s3]

Starts a private redis-server (AOF on, as in docker-compose), optionally moto's S3 server, the
gateway (uvicorn), one GPU worker serving the tiny checkpoint and the webhook worker, all as
separate processes on this machine, plus a loopback webhook receiver in this process. Then it
submits ``--jobs`` small syntheses one after another, each with ``Prefer: wait=60`` so the response
comes back when the job has ended, and a webhook subscribed to ``completed``.

Per job it measures:

- end-to-end latency: from sending the POST to receiving the finished job object;
- engine time: the worker's wall time inside ``engine.synthesize`` (``metrics.engine_seconds`` in
  the job record);
- service overhead = end-to-end latency - engine time (HTTP, validation, Redis, the broker, the
  pool hand-off, PNG encoding, storage writes, state changes and the wait's wake-up);
- webhook latency: from the job's ``completed_at`` to the receiver getting the POST.

Targets (issue 4): overhead p50 < 100 ms, webhook p50 < 100 ms.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from masactrl_jobs.catalog import tiny_model_entry  # noqa: E402 (needs the path above)

API_KEY = "bench-key-not-a-secret"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"bench webhook secret, 32 bytes!!").decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not happen within {timeout:g} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def service_env(
    workdir: Path, redis_url: str, port: int, storage_url: str, checkpoint: Path, *, tenant: str
) -> dict[str, str]:
    """The environment of every process of a benchmark stack: one tenant, the tiny model."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "HOME": str(workdir),
        "MASACTRL_ENVIRONMENT": "development",
        "MASACTRL_REDIS_URL": redis_url,
        "MASACTRL_STORAGE_URL": storage_url,
        "MASACTRL_URL_SIGNING_SECRET": f"{tenant}-url-signing-secret-0123456789abcdef",
        "MASACTRL_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "MASACTRL_CATALOG": json.dumps(
            {"default": "tiny", "models": [tiny_model_entry(str(checkpoint))]}
        ),
        "MASACTRL_ALLOW_LOOPBACK_HTTP": "true",
        "MASACTRL_API_KEYS": json.dumps(
            [
                {
                    "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                    "tenant": tenant,
                    "webhook_secret": WEBHOOK_SECRET,
                }
            ]
        ),
        "MASACTRL_RATE_LIMIT_PER_SECOND": "1000",
        "MASACTRL_RATE_LIMIT_BURST": "1000",
        "MASACTRL_TORCH_THREADS": "1",
    }


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} logical CPUs, "
        f"{device}; Python {platform.python_version()}, torch {torch.__version__}"
    )


class Receiver:
    """Records when each webhook POST arrives (time.time(), comparable with completed_at)."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                arrived = time.time()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.arrivals.setdefault(json.loads(body)["data"]["id"], arrived)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def start(name: str, args: list[str], env: dict[str, str], workdir: Path) -> subprocess.Popen:
    log = (workdir / f"{name}.log").open("wb")
    return subprocess.Popen(
        args, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--storage", choices=("file", "s3"), default="file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args()

    from masactrl_core.tiny import write_tiny_checkpoint
    from masactrl_jobs.store import JobStore

    workdir = Path(tempfile.mkdtemp(prefix="masactrl-bench-"))
    processes: list[subprocess.Popen] = []
    receiver = Receiver()
    try:
        checkpoint = write_tiny_checkpoint(workdir / "tiny")
        redis_port = free_port()
        processes.append(
            start(
                "redis",
                [
                    shutil.which("redis-server") or "redis-server",
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(workdir),
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                ],
                dict(os.environ),
                workdir,
            )
        )
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        port = free_port()
        env = service_env(
            workdir, redis_url, port, (workdir / "storage").as_uri(), checkpoint, tenant="bench"
        )
        if args.storage == "s3":
            s3_port = free_port()
            processes.append(
                start(
                    "moto",
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                    env,
                    workdir,
                )
            )
            endpoint = f"http://127.0.0.1:{s3_port}"
            env.update(
                MASACTRL_STORAGE_URL="s3://bench",
                MASACTRL_S3_ENDPOINT_URL=endpoint,
                MASACTRL_S3_ACCESS_KEY_ID="bench",
                MASACTRL_S3_SECRET_ACCESS_KEY="bench-secret",
                MASACTRL_S3_REGION="us-east-1",
            )
            import boto3

            s3 = boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id="bench",
                aws_secret_access_key="bench-secret",
                region_name="us-east-1",
            )

            def bucket_ready() -> bool:
                try:
                    s3.create_bucket(Bucket="bench")
                    return True
                except Exception:
                    return False

            wait_until(bucket_ready, 30, "moto")
        python = sys.executable
        processes.append(
            start(
                "gateway",
                [
                    python,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "service.main:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                env,
                workdir,
            )
        )
        processes.append(
            start(
                "gpu-worker",
                [python, "-m", "masactrl_cli.main", "worker", "--model", "tiny"],
                env,
                workdir,
            )
        )
        processes.append(
            start(
                "webhook-worker",
                [python, "-m", "masactrl_cli.main", "worker", "--webhooks"],
                env,
                workdir,
            )
        )
        store = JobStore.from_url(redis_url)
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {API_KEY}", "Prefer": "wait=60"},
            timeout=90,
        )

        def gateway_up() -> bool:
            try:
                return client.get("/livez").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(gateway_up, 120, "the gateway starting")
        wait_until(lambda: "tiny" in store.live_models(), 300, "the GPU worker loading the model")

        body = {
            "source_prompt": "a photo of a cat",
            "target_prompts": ["a photo of a dog"],
            "steps": args.steps,
            "webhook": {"url": receiver.url, "events": ["completed"]},
        }
        rows = []
        for index in range(args.warmup + args.jobs):
            sent = time.perf_counter()
            response = client.post("/v1/syntheses", json={**body, "seed": index})
            latency = time.perf_counter() - sent
            job = response.json()
            if response.status_code != 202 or job["status"] != "succeeded":
                raise RuntimeError(f"job did not succeed: {response.status_code} {job}")
            if index < args.warmup:
                continue
            record = store.get(job["id"])
            assert record is not None and record.completed_at is not None
            engine = float((record.metrics or {})["engine_seconds"])
            rows.append((job["id"], latency, engine, record.completed_at))

        wait_until(
            lambda: all(job_id in receiver.arrivals for job_id, *_ in rows), 60, "the webhooks"
        )
        overhead = [(latency - engine) * 1000 for _, latency, engine, _ in rows]
        webhook = [(receiver.arrivals[job_id] - done) * 1000 for job_id, _, _, done in rows]
        end_to_end = [latency * 1000 for _, latency, _, _ in rows]
        engine_ms = [engine * 1000 for _, _, engine, _ in rows]

        print(f"machine: {machine()}")
        print(
            f"{args.jobs} syntheses (tiny checkpoint, 64x64, {args.steps} steps, 1 target), "
            f"one at a time, storage={args.storage}"
        )
        for name, values, target in (
            ("end-to-end latency", end_to_end, None),
            ("engine time", engine_ms, None),
            ("service overhead", overhead, 100.0),
            ("completion -> webhook", webhook, 100.0),
        ):
            p50, p99 = percentile(values, 50), percentile(values, 99)
            verdict = ""
            if target is not None:
                verdict = f"   target p50 < {target:g} ms: {'met' if p50 < target else 'MISSED'}"
            print(
                f"  {name:<22} p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   "
                f"mean {statistics.fmean(values):7.1f} ms{verdict}"
            )
        store.close()
        client.close()
        return 0
    finally:
        for process in reversed(processes):
            stop(process)
        receiver.server.shutdown()
        if args.keep:
            print(f"logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
