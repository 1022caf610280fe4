"""Gateway submission throughput and latency, side by side with a bare FastAPI endpoint.

    .venv/bin/python bench/gateway.py [--duration 10] [--clients 50]

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--clients", type=int, default=50, help="concurrent connections")
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn processes for each server (default 1)"
    )
    parser.add_argument("--serve", choices=["gateway", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve_main(args.serve, args.port, args.workers)
        return 0

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
