"""The queue policy measured on real processes: how long a light tenant waits next to a heavy one.

    .venv/bin/python bench/queue.py [--heavy 60] [--light 12] [--every 2] [--keep]

(``bench/queue.py`` is the entry point; this module holds the measurement under a name that
does not stand for the standard library's ``queue``.)

For each policy, FIFO (``MASACTRL_QUEUE_POLICY=fifo``: submission order across tenants, what
Celery delivers) and fair share (``fair``: the store's queue policy), it starts a private
redis-server, the gateway (uvicorn) and one GPU worker on the tiny checkpoint, all on loopback.
Tenant ``heavy`` submits a batch at once; a second later tenant ``light`` starts submitting one
job every ``--every`` seconds, the way an interactive backend would. Every job is the same tiny
synthesis (a short step delay makes each take a few tenths of a second).

A job's wait is ``started_at - created_at`` as the job records it. It prints, per policy, the
light tenant's wait (p50, p99, max), the heavy batch's last start, and the machine it ran on.
No simulation: the numbers are what the worker did.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.service import (  # noqa: E402 (needs the path above)
    WEBHOOK_SECRET,
    free_port,
    machine,
    percentile,
    service_env,
    start,
    stop,
    wait_until,
)

KEYS = {"heavy": "bench-heavy-key-not-a-secret", "light": "bench-light-key-not-a-secret"}
STEPS = 4
STEP_DELAY_SECONDS = 0.05
JOB = {"source_prompt": "a photo of a cat", "target_prompts": ["a photo of a dog"], "steps": STEPS}


def _env(
    workdir: Path, redis_port: int, port: int, checkpoint: Path, policy: str
) -> dict[str, str]:
    env = service_env(
        workdir,
        f"redis://127.0.0.1:{redis_port}/0",
        port,
        (workdir / "storage").as_uri(),
        checkpoint,
        tenant="heavy",
    )
    keys = [
        {"sha256": hashlib.sha256(key.encode()).hexdigest(), "tenant": tenant}
        | {"webhook_secret": WEBHOOK_SECRET}
        for tenant, key in KEYS.items()
    ]
    return env | {
        "HF_HUB_OFFLINE": "1",
        "MASACTRL_API_KEYS": json.dumps(keys),
        "MASACTRL_QUEUE_POLICY": policy,
        "MASACTRL_MAX_QUEUE_DEPTH": "0",
        "MASACTRL_CLEANUP_INTERVAL_SECONDS": "0",
        "MASACTRL_WARMUP": "false",
        "MASACTRL_STEP_DELAY_SECONDS": str(STEP_DELAY_SECONDS),
    }


def _started(job: dict[str, Any]) -> float:
    return datetime.fromisoformat(job["started_at"]).timestamp()


def _wait(job: dict[str, Any]) -> float:
    return _started(job) - datetime.fromisoformat(job["created_at"]).timestamp()


def run_policy(
    policy: str, checkpoint: Path, workdir: Path, heavy: int, light: int, every: float
) -> dict[str, Any]:
    """One stack under ``policy``; the jobs of both tenants as they ended."""
    workdir.mkdir(parents=True)
    redis_port, port = free_port(), free_port()
    env = _env(workdir, redis_port, port, checkpoint, policy)
    redis_server = shutil.which("redis-server") or "redis-server"
    processes = [
        start("redis", [redis_server, "--port", str(redis_port), "--save", ""], env, workdir)
    ]
    python = sys.executable
    uvicorn = [python, "-m", "uvicorn", "--factory", "service.main:create_app"]
    uvicorn += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    processes.append(start("gateway", uvicorn, env, workdir))
    worker = [python, "-m", "masactrl_cli.main", "worker", "--model", "tiny"]
    processes.append(start("gpu", worker, env, workdir))
    clients = {
        tenant: httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        for tenant, key in KEYS.items()
    }
    try:

        def ready() -> bool:
            try:
                models = clients["heavy"].get("/v1/models").json()["data"]
            except (httpx.TransportError, ValueError, KeyError):
                return False
            return any(m.get("live") for m in models)

        wait_until(ready, 300, f"the {policy} stack starting")
        ids: dict[str, list[str]] = {"heavy": [], "light": []}

        def submit(tenant: str) -> None:
            response = clients[tenant].post("/v1/syntheses", json=JOB)
            response.raise_for_status()
            ids[tenant].append(response.json()["id"])

        for _ in range(heavy):
            submit("heavy")

        def light_tenant() -> None:
            time.sleep(1.0)
            for _ in range(light):
                submit("light")
                time.sleep(every)

        thread = threading.Thread(target=light_tenant)
        thread.start()
        thread.join()
        jobs: dict[str, list[dict[str, Any]]] = {"heavy": [], "light": []}
        for tenant, tenant_ids in ids.items():
            for job_id in tenant_ids:
                path = f"/v1/jobs/{job_id}"
                deadline = time.monotonic() + 600
                while True:
                    job = clients[tenant].get(path, headers={"Prefer": "wait=30"}).json()
                    if job["status"] not in ("queued", "running"):
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_id} did not end")
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
                jobs[tenant].append(job)
        return jobs
    finally:
        for client in clients.values():
            client.close()
        for process in reversed(processes):
            stop(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heavy", type=int, default=60, help="the heavy tenant's batch")
    parser.add_argument("--light", type=int, default=12, help="the light tenant's jobs")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between light jobs")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args()

    from masactrl_core.tiny import write_tiny_checkpoint

    workdir = Path(tempfile.mkdtemp(prefix="masactrl-queue-"))
    checkpoint = write_tiny_checkpoint(workdir / "tiny")
    rows = []
    try:
        for policy in ("fifo", "fair"):
            began = time.monotonic()
            jobs = run_policy(
                policy, checkpoint, workdir / policy, args.heavy, args.light, args.every
            )
            waits = [_wait(j) for j in jobs["light"]]
            first = min(_started(j) for j in jobs["heavy"] + jobs["light"])
            last_heavy = max(_started(j) for j in jobs["heavy"]) - first
            rows.append((policy, waits, last_heavy, time.monotonic() - began))
    finally:
        if args.keep:
            print(f"logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"machine: {machine()}")
    print(
        f"1 GPU worker on the tiny checkpoint (64x64, {STEPS} steps, {STEP_DELAY_SECONDS:g} s "
        f"step delay); tenant heavy submits {args.heavy} jobs at once, tenant light "
        f"{args.light} jobs, one every {args.every:g} s from 1 s later; equal weights"
    )
    header = (
        "policy",
        "light wait p50 s",
        "light wait p99 s",
        "light wait max s",
        "heavy batch's last start s",
        "run s",
    )
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for policy, waits, last_heavy, took in rows:
        cells = (percentile(waits, 50), percentile(waits, 99), max(waits), last_heavy, took)
        print(f"| {policy} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
