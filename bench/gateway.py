"""Gateway submission throughput and latency, side by side with a bare FastAPI endpoint; and,
with ``--memory``, the gateway's memory under large inputs.

    .venv/bin/python bench/gateway.py [--duration 10] [--clients 50]
    .venv/bin/python bench/gateway.py --memory

``--memory`` serves the real gateway alone (file storage, loopback URLs allowed) and reports its
resident memory growth (RSS sampled every 20 ms, peak minus the level before, and the level a
second after) for 8 concurrent 40 MB multipart edits (a 20 MB PNG as the photo and as a
condition image), 8 concurrent multipart sequences with a 40 MB video (a 4-frame MP4 grown by a
``free`` box), and 4 concurrent JSON edits naming one 20 MB PNG, served on loopback, 25 times.

Starts a private redis-server (AOF on, as in docker-compose) on a free port, then serves, one after
the other on the same machine: the real gateway (``service.main:create_app`` under uvicorn, one
process, as ``masactrl serve`` runs it) and a bare FastAPI app whose one endpoint parses the same
JSON body and returns a job-sized JSON body. For each, ``--clients`` concurrent keep-alive
connections POST syntheses in a closed loop for ``--duration`` seconds after a warm-up, and the
accepted requests per second and client-side p50/p99 latency are reported. No worker consumes the
queue: accepted jobs stay queued in Redis, so the queue-depth limit is off for the run.

The load generator is a minimal HTTP/1.1 client on raw asyncio streams, so its own cost per
request stays small next to the server's (it shares the machine with it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this directory comes first on sys.path, where bench/service.py would shadow
# the gateway's `service` package; the repository root takes its place.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(REPO)
API_KEY = "bench-key-not-a-secret"
BODY = json.dumps(
    {
        "source_prompt": "a photo of a corgi on the beach",
        "target_prompts": ["a photo of a corgi jumping on the beach"],
        "steps": 50,
    }
).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(
    port: int, timeout: float = 30.0, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


# --- the bare baseline ------------------------------------------------------------------------


def bare_app() -> Any:
    """A FastAPI app with one POST endpoint: parse a JSON body, return a job-sized JSON body."""
    from fastapi import FastAPI

    app = FastAPI()
    # The shape and size of a freshly queued synthesis job as the gateway returns it.
    job = {
        "id": "01960000-0000-7000-8000-000000000000",
        "kind": "synthesis",
        "status": "queued",
        "created_at": "2025-01-01T00:00:00.000000Z",
        "started_at": None,
        "completed_at": None,
        "model": "sd15",
        "input": {
            "image": None,
            "source_prompt": "a photo of a corgi on the beach",
            "target_prompts": ["a photo of a corgi jumping on the beach"],
            "negative_prompt": "",
            "seed": 1234567890,
            "steps": 50,
            "guidance_scale": 7.5,
            "width": 512,
            "height": 512,
            "control": {
                "start_step": 4,
                "start_layer": 10,
                "layers": None,
                "steps": None,
                "mask": {
                    "mode": "none",
                    "regions": None,
                    "source_word": None,
                    "target_word": None,
                    "threshold": 0.1,
                },
            },
        },
        "queue_position": 1,
        "progress": None,
        "output": None,
        "error": None,
        "metrics": None,
        "attempts": 0,
        "webhook": None,
        "urls": {
            "self": "http://127.0.0.1:8000/v1/jobs/01960000-0000-7000-8000-000000000000",
            "cancel": "http://127.0.0.1:8000/v1/jobs/01960000-0000-7000-8000-000000000000/cancel",
            "events": "http://127.0.0.1:8000/v1/jobs/01960000-0000-7000-8000-000000000000/events",
        },
    }

    @app.post("/v1/syntheses", status_code=202)
    async def create(body: dict) -> dict:
        return job

    return app


# --- load generation --------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int, descendants: bool = False) -> float:
    """User + system CPU time a process (and optionally its live descendants) has used so far.

    Descendants count for a server: uvicorn with --workers serves from child processes.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if descendants else ():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        fields = _stat(current)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
        todo += children.get(current, [])
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    accepted: int
    other: dict[int, int]
    errors: int
    seconds: float
    latencies_ms: list[float]
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _client(
    port: int, stop_at: float, measure_from: float, result: Result, request: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (now := time.perf_counter()) < stop_at:
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            done = time.perf_counter()
            if now < measure_from:
                continue  # warm-up
            status = int(status_line.split(b" ", 2)[1])
            if status == 202:
                result.accepted += 1
                result.latencies_ms.append((done - now) * 1000)
            else:
                result.other[status] = result.other.get(status, 0) + 1
    except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
        result.errors += 1
    finally:
        writer.close()


async def load(name: str, port: int, clients: int, warmup: float, duration: float) -> Result:
    request = (
        b"POST /v1/syntheses HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
    )
    result = Result(name, 0, {}, 0, duration, [])
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration
    await asyncio.gather(
        *(_client(port, stop_at, measure_from, result, request) for _ in range(clients))
    )
    return result


# --- processes --------------------------------------------------------------------------------


def start_redis(directory: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process=process)
    return process, port


def serve(target: str, port: int, env: dict[str, str], workers: int) -> subprocess.Popen:
    script = str(Path(__file__).resolve())
    process = subprocess.Popen(
        [sys.executable, script, "--serve", target, "--port", str(port), "--workers", str(workers)],
        env=env,
        cwd=REPO,
    )
    wait_for_port(port, process=process)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _serve_main(target: str, port: int, workers: int) -> None:
    import uvicorn

    common: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "log_level": "warning",
        "access_log": False,
        "workers": workers,
        "factory": True,
    }
    # Import strings, as `masactrl serve` uses, so --workers > 1 works for both.
    if target == "gateway":
        uvicorn.run("service.main:create_app", **common)
    else:
        uvicorn.run("bench.gateway:bare_app", **common)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    redis_version = subprocess.run(
        [shutil.which("redis-server") or "redis-server", "--version"],
        capture_output=True,
        text=True,
    ).stdout.split()[2]
    import fastapi
    import uvicorn

    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, FastAPI {fastapi.__version__}, "
        f"uvicorn {uvicorn.__version__}, Redis {redis_version.removeprefix('v=')}; "
        f"load average before the run {os.getloadavg()[0]:.2f}"
    )


def report(results: list[Result]) -> str:
    rows = [
        f"{'endpoint':<10} {'accepted/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'non-202':>8}"
        f"   CPU µs/request: {'server':>7} {'redis':>6} {'client':>7}"
    ]
    for r in results:
        others = sum(r.other.values()) + r.errors
        rows.append(
            f"{r.name:<10} {r.rate:>11.0f} {r.percentile(0.50):>8.1f} "
            f"{r.percentile(0.99):>8.1f} {others:>8}                   "
            f"{r.cpu.get('server', 0):>7.0f} {r.cpu.get('redis', 0):>6.0f} "
            f"{r.cpu.get('client', 0):>7.0f}"
        )
    gateway, bare = results
    ratio = gateway.rate / bare.rate
    rows.append("")
    rows.append(
        f"gateway/bare throughput: {ratio:.2f} (target >= 0.4: "
        f"{'met' if ratio >= 0.4 else 'NOT met'}); gateway p99 {gateway.percentile(0.99):.1f} ms "
        f"(target < 50 ms: {'met' if gateway.percentile(0.99) < 50 else 'NOT met'})"
    )
    return "\n".join(rows)


# --- memory under large inputs ------------------------------------------------------------------

MiB = 1024 * 1024
_CATALOG = {
    "default": "sd15",
    "models": {
        "sd15": {
            "source": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "family": "sd",
            "conditions": {
                "canny": {"source": "lllyasviel/sd-controlnet-canny", "kind": "controlnet"}
            },
        }
    },
}
_PARAMS = {
    "source_prompt": "a photo of a cat",
    "target_prompts": ["a photo of a dog"],
    "condition": {"model": "canny"},
}


def _big_png() -> bytes:
    """A 20 MB PNG: 2600×2600, stored uncompressed (cheap to make, a full decode to check)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (2600, 2600), (90, 120, 150)).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def _padded_video(total: int) -> bytes:
    """A real 4-frame MP4 grown to ``total`` bytes by a top-level ``free`` box (skipped)."""
    import struct

    from PIL import Image

    from masactrl_jobs.media import encode_mp4

    video = encode_mp4([Image.new("RGB", (64, 64), (40 * k, 80, 120)) for k in range(4)], 8.0)
    pad = total - len(video)
    return video + struct.pack(">I", pad) + b"free" + bytes(pad - 8)


def _memory_scenarios(url: str, png_url: str) -> list[tuple[str, int, Any]]:
    """(name, concurrency, send) per scenario; send() posts once and returns the status."""
    import httpx

    png = _big_png()
    video = _padded_video(40 * MiB)
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def multipart(path: str, files: list[tuple[str, tuple[str, bytes, str]]]) -> int:
        data = {"params": json.dumps(_PARAMS)}
        response = httpx.post(url + path, headers=headers, files=files, data=data, timeout=300)
        return response.status_code

    def amplified() -> int:
        body = {
            "image": png_url,
            "source_prompt": "a photo of a cat",
            "target_prompts": [f"a photo of a dog, take {k}" for k in range(8)],
            "control": {
                "mask": {"mode": "manual", "regions": [{"source": png_url, "target": png_url}] * 8}
            },
            "condition": {"model": "canny", "images": [png_url] * 8},
        }
        return httpx.post(url + "/v1/edits", headers=headers, json=body, timeout=300).status_code

    edit_files = [
        ("image", ("a.png", png, "image/png")),
        ("condition_image", ("b.png", png, "image/png")),
    ]
    return [
        ("edits, 8 × 40 MB multipart", 8, lambda: multipart("/v1/edits", edit_files)),
        (
            "sequences, 8 × 40 MB video",
            8,
            lambda: multipart("/v1/sequences", [("video", ("v.mp4", video, "video/mp4"))]),
        ),
        ("edits, 4 × 25 URLs of 20 MB", 4, amplified),
    ]


def _measure_rss(pid: int, send: Any, count: int) -> tuple[int, int, int, list[int]]:
    """(before, peak, a second after, statuses) of ``count`` concurrent ``send()`` calls."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    process = psutil.Process(pid)
    before = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(count) as pool:
            statuses = list(pool.map(lambda _: send(), range(count)))
    finally:
        done.set()
        sampler.join()
    time.sleep(1.0)
    return before, peak, process.memory_info().rss, statuses


def memory_main() -> int:
    """Print the gateway's RSS growth under each large-input scenario."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    print(f"machine: {machine()}\n")
    png = _big_png()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

    images = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    png_url = f"http://127.0.0.1:{images.server_address[1]}/big.png"
    rows = [f"{'scenario':<30} {'peak growth':>12} {'a second after':>15}   statuses"]
    with tempfile.TemporaryDirectory(prefix="masactrl-bench-") as tmp:
        redis_process, redis_port = start_redis(Path(tmp))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MASACTRL_")},
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "TMPDIR": tmp,
            "MASACTRL_ENVIRONMENT": "development",
            "MASACTRL_ALLOW_LOOPBACK_HTTP": "true",
            "MASACTRL_DEV_API_KEY": API_KEY,
            "MASACTRL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "MASACTRL_STORAGE_URL": Path(tmp, "storage").as_uri(),
            "MASACTRL_URL_SIGNING_SECRET": "bench-signing-secret-0123456789abcdef",
            "MASACTRL_MAX_QUEUE_DEPTH": "0",
            "MASACTRL_RATE_LIMIT_PER_SECOND": "1000000",
            "MASACTRL_RATE_LIMIT_BURST": "1000000",
            "MASACTRL_CLEANUP_INTERVAL_SECONDS": "0",
            "MASACTRL_CATALOG": json.dumps(_CATALOG),
            "MASACTRL_LARGE_UPLOAD_WAIT_SECONDS": "300",  # every upload gets its turn
        }
        port = free_port()
        process = serve("gateway", port, env, 1)
        try:
            url = f"http://127.0.0.1:{port}"
            for name, count, send in _memory_scenarios(url, png_url):
                send()  # once first: code loaded on first use is not growth
                before, peak, after, statuses = _measure_rss(process.pid, send, count)
                grew, kept = (peak - before) / MiB, (after - before) / MiB
                shown = ", ".join(str(s) for s in sorted(statuses))
                rows.append(f"{name:<30} {grew:>8.0f} MiB {kept:>+11.0f} MiB   {shown}")
        finally:
            stop(process)
            stop(redis_process)
            images.shutdown()
    print("\n".join(rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=50, help="concurrent connections")
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn processes for each server (default 1)"
    )
    parser.add_argument(
        "--memory", action="store_true", help="measure memory under large inputs instead"
    )
    parser.add_argument("--serve", choices=["gateway", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve_main(args.serve, args.port, args.workers)
        return 0
    if args.memory:
        return memory_main()

    print(f"machine: {machine()}")
    print(
        f"{args.clients} clients, {args.warmup:g} s warm-up, {args.duration:g} s measured each, "
        f"{args.workers} uvicorn process(es) per server\n"
    )
    with tempfile.TemporaryDirectory(prefix="masactrl-bench-") as tmp:
        redis_process, redis_port = start_redis(Path(tmp))
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MASACTRL_")},
            # The repository first, whatever the install: the bench measures this checkout.
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "MASACTRL_ENVIRONMENT": "development",
            "MASACTRL_DEV_API_KEY": API_KEY,
            "MASACTRL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "MASACTRL_STORAGE_URL": Path(tmp, "storage").as_uri(),
            "MASACTRL_URL_SIGNING_SECRET": "bench-signing-secret-0123456789abcdef",
            "MASACTRL_MAX_QUEUE_DEPTH": "0",
            "MASACTRL_RATE_LIMIT_PER_SECOND": "1000000",
            "MASACTRL_RATE_LIMIT_BURST": "1000000",
            "MASACTRL_CLEANUP_INTERVAL_SECONDS": "0",
        }
        results = []
        try:
            for name in ("gateway", "bare"):
                port = free_port()
                process = serve(name, port, env, args.workers)
                try:
                    pids = {"server": process.pid, "redis": redis_process.pid}
                    pids["client"] = os.getpid()
                    before = {
                        role: cpu_seconds(pid, role == "server") for role, pid in pids.items()
                    }
                    result = asyncio.run(load(name, port, args.clients, args.warmup, args.duration))
                    used = {
                        role: cpu_seconds(pid, role == "server") - before[role]
                        for role, pid in pids.items()
                    }
                    # Per request over the whole run (warm-up included), in microseconds.
                    requests = result.accepted * (args.warmup + args.duration) / args.duration
                    result.cpu = {role: seconds / requests * 1e6 for role, seconds in used.items()}
                    results.append(result)
                finally:
                    stop(process)
            import redis

            client = redis.Redis(port=redis_port)
            queued = client.zcard("masactrl:queue:sd15")
            broker = client.llen("masactrl.sd15")
            client.close()
        finally:
            stop(redis_process)
    print(report(results))
    print(f"\njobs recorded in Redis: {queued}, messages in the broker queue: {broker}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
