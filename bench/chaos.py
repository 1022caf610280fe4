"""Fault injection on real local processes: does every job end exactly once, whatever breaks?

    .venv/bin/python bench/chaos.py [--jobs 4] [--quick] [--keep]

Starts a private redis-server (AOF on, as in docker-compose), the gateway (uvicorn), two GPU
workers on the tiny checkpoint, the webhook worker and a loopback webhook receiver, all on this
machine and on loopback only. Then, one after another, each fault hits a batch of fresh jobs
(slow syntheses, each with a webhook subscribed to ``completed``):

- ``worker_sigkill``: the worker running a job is killed (SIGKILL, its whole process group);
- ``redis_restart``: Redis is restarted (SIGTERM, then started from its AOF) with jobs queued
  and one running;
- ``storage_outage``: the storage root is replaced by a plain file for a few seconds, so every
  write fails; jobs end ``succeeded`` or, if they finish inside the outage, ``failed`` with
  ``storage_unavailable`` (that is the expected failure);
- ``webhook_failing_then_hanging``: the receiver answers 500 for a while, then hangs past the
  delivery timeout, then recovers; every job's terminal webhook must still arrive;
- ``worker_stalled_past_lease``: the worker running a job is frozen (SIGSTOP) past its lease
  while the other worker takes the job over, then thawed (SIGCONT); the late worker must neither
  end the job nor delete its results;
- ``redis_failover``: on a second stack whose Redis is Sentinel-managed (1 primary, 1 replica,
  3 sentinels; ``tests/sentinel_cluster.py``), the primary is killed (SIGKILL) with jobs queued,
  one running under its lease and webhooks being delivered; Sentinel promotes the replica and
  every process must follow it. Its row also says how many seconds after the kill the gateway
  accepted a submission again (``recovery s``).

Per fault it prints submitted / succeeded / failed-as-expected / lost (not ended in time, or its
terminal webhook never arrived) / run twice (more than one terminal event, or more than one
worker logged its success), and the machine it ran on. Every wait is bounded. ``--quick`` runs
one job per fault with shorter waits (what tests/bench/test_chaos.py runs). The exit status is 1
when any job was lost or run twice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from masactrl_jobs.store import JobStore

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.service import (  # noqa: E402 (needs the path above)
    API_KEY,
    free_port,
    machine,
    service_env,
    start,
    stop,
    wait_until,
)
from tests.sentinel_cluster import SentinelCluster  # noqa: E402 (the tests' launcher, shared)

FAULTS = (
    "worker_sigkill",
    "redis_restart",
    "storage_outage",
    "webhook_failing_then_hanging",
    "worker_stalled_past_lease",
    "redis_failover",
)
# Faults that need the Sentinel-managed stack; the others share the plain one.
SENTINEL_FAULTS = ("redis_failover",)
RECOVERY_SECONDS = 6.0  # lease 3 s, janitor every 1.5 s
WEBHOOK_TIMEOUT_SECONDS = 1.0
STEP_DELAY_SECONDS = 0.1
STEPS = 20  # about two seconds of step delays a job (--quick: 10)
EXPECTED_FAILURES = {"storage_outage": {"storage_unavailable"}}


class Receiver:
    """A loopback webhook receiver whose behaviour the faults switch: ok, fail or hang."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.terminal: dict[str, set[str]] = {}  # job id -> webhook ids of its terminal events
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = receiver.mode
                if mode == "hang":
                    time.sleep(WEBHOOK_TIMEOUT_SECONDS * 3)
                if mode != "ok":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                event = json.loads(body)
                if event["type"] in ("job.succeeded", "job.failed", "job.canceled"):
                    with receiver.lock:
                        ids = receiver.terminal.setdefault(event["data"]["id"], set())
                        ids.add(self.headers.get("webhook-id", ""))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"


@dataclass
class Tally:
    """What became of one fault's jobs."""

    fault: str
    submitted: int = 0
    succeeded: int = 0
    failed_as_expected: int = 0
    lost: int = 0
    run_twice: int = 0
    recovery_seconds: float | None = None
    notes: list[str] = field(default_factory=list)


class Stack:
    """The processes under test, their logs, and the client that drives them."""

    def __init__(
        self, workdir: Path, checkpoint: Path, steps: int, *, sentinel: bool = False
    ) -> None:
        self.workdir = workdir
        self.steps = steps
        self.storage = workdir / "storage"
        self.cluster = SentinelCluster(workdir) if sentinel else None
        self.redis_port = free_port()
        self.port = free_port()
        self.receiver = Receiver()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **service_env(
                workdir,
                f"redis://127.0.0.1:{self.redis_port}/0",
                self.port,
                self.storage.as_uri(),
                checkpoint,
                tenant="chaos",
            ),
            "HF_HUB_OFFLINE": "1",
            "MASACTRL_CLEANUP_INTERVAL_SECONDS": "0",
            "MASACTRL_WARMUP": "false",  # start-up time is not what this measures
            "MASACTRL_RECOVERY_SECONDS": str(RECOVERY_SECONDS),
            "MASACTRL_WORKER_HEARTBEAT_TTL_SECONDS": "3",
            "MASACTRL_STEP_DELAY_SECONDS": str(STEP_DELAY_SECONDS),
            "MASACTRL_SOFT_TIME_LIMIT_SECONDS": "60",
            "MASACTRL_TIME_LIMIT_SECONDS": "70",
            "MASACTRL_VISIBILITY_TIMEOUT_SECONDS": "120",
            "MASACTRL_STORAGE_RETRY_ATTEMPTS": "3",
            "MASACTRL_STORAGE_RETRY_MAX_WAIT_SECONDS": "0.5",
            "MASACTRL_WEBHOOK_TIMEOUT_SECONDS": str(WEBHOOK_TIMEOUT_SECONDS),
            "MASACTRL_WEBHOOK_RETRY_DELAYS_SECONDS": "[0.5, 1, 1, 2]",
            "MASACTRL_WEBHOOK_MAX_ATTEMPTS": "30",
            "MASACTRL_WEBHOOK_RETRY_JITTER": "0",
            "MASACTRL_WEBHOOK_SCHEDULER_INTERVAL_SECONDS": "0.2",
        }
        workdir.mkdir(parents=True, exist_ok=True)
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )

    # -- processes ---------------------------------------------------------------------------

    def _start(self, name: str, args: list[str]) -> None:
        self.processes[name] = start(name, args, self.env, self.workdir)

    def start_redis(self) -> None:
        if self.cluster is not None:
            self.cluster.start()
            self.env.update(self.cluster.environment())
            return
        redis_server = shutil.which("redis-server") or "redis-server"
        args = [redis_server, "--port", str(self.redis_port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.workdir), "--appendonly", "yes", "--save", ""]
        self._start("redis", args)
        wait_until(self._redis_answers, 30, "redis-server starting")

    def _redis_answers(self) -> bool:
        store = self.store()
        try:
            return store.ping()
        except Exception:
            return False
        finally:
            store.close()

    def start_all(self) -> None:
        self.start_redis()
        python = sys.executable
        uvicorn = [python, "-m", "uvicorn", "--factory", "service.main:create_app"]
        uvicorn += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self._start("gateway", uvicorn)
        worker = [python, "-m", "masactrl_cli.main", "worker"]
        for name in ("gpu-a", "gpu-b"):
            self._start(name, [*worker, "--model", "tiny", "--hostname", f"{name}@chaos"])
        self._start("webhook-worker", [*worker, "--webhooks", "--concurrency", "8"])

        def gateway_up() -> bool:
            try:
                return self.client.get("/livez").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(gateway_up, 120, "the gateway starting")
        wait_until(lambda: len(self.live_workers()) == 2, 300, "both GPU workers loading")

    def live_workers(self) -> set[str]:
        store = self.store()
        try:
            return store.live_workers("tiny")
        except Exception:
            return set()
        finally:
            store.close()

    def signal_worker_of(self, job_id: str, sig: int) -> str:
        """Send ``sig`` to the process group of the worker running ``job_id``; its name."""
        child = int(self.worker_of(job_id).split(":")[2])
        group = os.getpgid(child)
        for name, process in self.processes.items():
            if process.pid == group:
                os.killpg(group, sig)
                return name
        raise RuntimeError(f"job {job_id} runs on no worker of this stack")

    def stop_all(self) -> None:
        # All at once: each warm shutdown takes a moment, and nothing here depends on the order.
        running = [p for p in self.processes.values() if p.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)  # a stalled worker must hear SIGTERM
                os.killpg(process.pid, signal.SIGTERM)
        for process in running:
            stop(process)  # waits for the exit, and kills what does not exit in time
        if self.cluster is not None:
            self.cluster.stop()
        self.client.close()
        self.receiver.server.shutdown()

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, count: int, seed: int) -> list[str]:
        ids = []
        for n in range(count):
            response = self._post_synthesis(seed + n)
            if response.status_code != 202:
                raise RuntimeError(f"submission refused: {response.status_code} {response.text}")
            ids.append(response.json()["id"])
        return ids

    def _post_synthesis(self, seed: int) -> httpx.Response:
        body = {
            "source_prompt": "a photo of a cat",
            "target_prompts": ["a photo of a dog"],
            "steps": self.steps,
            "seed": seed,
            "webhook": {"url": self.receiver.url, "events": ["completed"]},
        }
        return self.client.post("/v1/syntheses", json=body)

    def try_submit(self, seed: int) -> str | None:
        """One job's id, or None while the gateway refuses it (a 503 during an outage)."""
        try:
            response = self._post_synthesis(seed)
        except httpx.TransportError:
            return None
        return response.json()["id"] if response.status_code == 202 else None

    def job(self, job_id: str) -> dict[str, Any] | None:
        try:
            response = self.client.get(f"/v1/jobs/{job_id}")
        except httpx.TransportError:
            return None
        return response.json() if response.status_code == 200 else None

    def store(self) -> JobStore:
        from masactrl_jobs.store import JobStore

        if self.cluster is not None:
            return JobStore.from_url(self.cluster.target())
        return JobStore.from_url(self.env["MASACTRL_REDIS_URL"])

    def worker_of(self, job_id: str) -> str:
        """The worker id running ``job_id`` (host:model:pid:nonce)."""
        store = self.store()
        try:
            record = store.get(job_id)
        finally:
            store.close()
        if record is None or not record.worker_id:
            raise RuntimeError(f"job {job_id} has no worker")
        return record.worker_id

    def terminal_events(self, job_id: str) -> int:
        store = self.store()
        try:
            return sum(1 for event in store.read_events(job_id, count=10_000) if event.is_terminal)
        finally:
            store.close()

    def running_job(self, ids: list[str], min_step: int, timeout: float) -> str:
        """Wait for one of ``ids`` to run at ``min_step`` or later; its id."""
        found: list[str] = []

        def one_running() -> bool:
            for job_id in ids:
                job = self.job(job_id) or {}
                progress = job.get("progress") or {}
                if job.get("status") == "running" and progress.get("step", 0) >= min_step:
                    found.append(job_id)
                    return True
            return False

        wait_until(one_running, timeout, "a job running")
        return found[0]

    def successes_logged(self, job_id: str) -> int:
        pattern = re.compile(rf"job {re.escape(job_id)} succeeded in")
        total = 0
        for name in ("gpu-a", "gpu-b"):
            log = self.workdir / f"{name}.log"
            if log.exists():
                total += len(pattern.findall(log.read_text(errors="replace")))
        return total

    def settle(self, fault: str, ids: list[str], timeout: float) -> Tally:
        """Wait (bounded) for the jobs and their webhooks, then count what became of them."""
        deadline = time.monotonic() + timeout
        final: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline and len(final) < len(ids):
            for job_id in ids:
                if job_id not in final:
                    job = self.job(job_id)
                    if job and job["status"] in ("succeeded", "failed", "canceled"):
                        final[job_id] = job
            time.sleep(0.2)
        while time.monotonic() < deadline and not all(j in self.receiver.terminal for j in final):
            time.sleep(0.2)
        tally = Tally(fault, submitted=len(ids))
        expected = EXPECTED_FAILURES.get(fault, set())
        for job_id in ids:
            job = final.get(job_id)
            if job is None:
                tally.lost += 1
                tally.notes.append(f"{job_id} never ended")
                continue
            if job_id not in self.receiver.terminal:
                tally.lost += 1
                tally.notes.append(f"{job_id}: terminal webhook never arrived")
            if job["status"] == "succeeded":
                tally.succeeded += 1
            elif job["status"] == "failed" and (job.get("error") or {}).get("code") in expected:
                tally.failed_as_expected += 1
            else:
                tally.notes.append(f"{job_id} ended {job['status']}: {job.get('error')}")
            if self.terminal_events(job_id) > 1 or self.successes_logged(job_id) > 1:
                tally.run_twice += 1
        return tally


# --- the faults -----------------------------------------------------------------------------------


def worker_sigkill(stack: Stack, ids: list[str], wait: float) -> None:
    victim = stack.running_job(ids, 3, wait)
    name = stack.signal_worker_of(victim, signal.SIGKILL)
    stack.processes[name].wait(10)
    # Not restarted: the other worker takes the job over once the lease lapses.


def redis_restart(stack: Stack, ids: list[str], wait: float) -> None:
    stack.running_job(ids, 3, wait)
    stop(stack.processes["redis"])  # SIGTERM: Redis writes its AOF, then exits
    time.sleep(2)
    stack.start_redis()


def storage_outage(stack: Stack, ids: list[str], wait: float) -> None:
    stack.running_job(ids, stack.steps - 3, wait)  # the outage meets its result writes
    aside = stack.storage.with_name("storage-aside")
    stack.storage.rename(aside)
    stack.storage.write_text("not a directory: storage is down")
    time.sleep(4)
    stack.storage.unlink()
    aside.rename(stack.storage)


def webhook_failing_then_hanging(stack: Stack, ids: list[str], wait: float) -> None:
    stack.receiver.mode = "fail"
    stack.running_job(ids, 1, wait)
    time.sleep(3)  # the first terminal webhooks fail and are retried
    stack.receiver.mode = "hang"
    time.sleep(3 * WEBHOOK_TIMEOUT_SECONDS)  # their retries time out
    stack.receiver.mode = "ok"


def worker_stalled_past_lease(stack: Stack, ids: list[str], wait: float) -> None:
    victim = stack.running_job(ids, 3, wait)
    name = stack.signal_worker_of(victim, signal.SIGSTOP)
    try:
        # Frozen until the other worker has taken the job over and ended it.
        wait_until(
            lambda: (stack.job(victim) or {}).get("status") in ("succeeded", "failed"),
            wait + RECOVERY_SECONDS * 2,
            "the other worker ending the stalled job",
        )
    finally:
        os.killpg(stack.processes[name].pid, signal.SIGCONT)
    time.sleep(RECOVERY_SECONDS / 2)  # let the thawed worker try to finish, and be refused


def redis_failover(stack: Stack, ids: list[str], wait: float) -> float:
    """Kill the Redis primary mid-run; the seconds until the gateway accepts a job again.

    The job accepted first after the kill joins ``ids``: it must end exactly once too.
    """
    assert stack.cluster is not None
    stack.running_job(ids, 3, wait)  # a lease held, the other jobs queued
    old = stack.cluster.kill_master()
    killed = time.monotonic()
    # Submissions fail (503) until the sentinels agree and the gateway dials the new master.
    while (job_id := stack.try_submit(seed=999)) is None:
        if time.monotonic() - killed > wait:
            raise TimeoutError(f"the gateway did not accept a job within {wait:g} s of the kill")
        time.sleep(0.1)
    recovered = time.monotonic() - killed
    ids.append(job_id)
    stack.cluster.wait_for_failover(old, wait)
    return recovered


RUNS: dict[str, Callable[[Stack, list[str], float], float | None]] = {
    "worker_sigkill": worker_sigkill,
    "redis_restart": redis_restart,
    "storage_outage": storage_outage,
    "webhook_failing_then_hanging": webhook_failing_then_hanging,
    "worker_stalled_past_lease": worker_stalled_past_lease,
    "redis_failover": redis_failover,
}
# The stall needs both workers, so it runs before the kill takes one away.
ORDER = (
    "worker_stalled_past_lease",
    "redis_restart",
    "storage_outage",
    "webhook_failing_then_hanging",
    "worker_sigkill",
    "redis_failover",
)


def print_table(tallies: list[Tally], started: float) -> None:
    header = (
        "fault",
        "submitted",
        "succeeded",
        "failed as expected",
        "lost",
        "run twice",
        "recovery s",
    )
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for t in tallies:
        recovery = "-" if t.recovery_seconds is None else f"{t.recovery_seconds:.1f}"
        cells = (t.submitted, t.succeeded, t.failed_as_expected, t.lost, t.run_twice, recovery)
        print(f"| {t.fault} | " + " | ".join(str(c) for c in cells) + " |")
    total = [sum(getattr(t, f) for t in tallies) for f in ("lost", "run_twice")]
    print(f"\ntotal lost {total[0]}, run twice {total[1]}; {time.monotonic() - started:.0f} s")
    for t in tallies:
        for note in t.notes:
            print(f"  {t.fault}: {note}")


def run_faults(
    stack: Stack, faults: list[str], jobs: int, wait: float, tallies: list[Tally]
) -> None:
    """Start ``stack``, run each fault on a fresh batch of jobs (tallied), then stop it."""
    started = time.monotonic()
    try:
        stack.start_all()
        kind = "Sentinel" if stack.cluster else "plain"
        print(f"{kind} stack up in {time.monotonic() - started:.0f} s", flush=True)
        for fault in faults:
            ids = stack.submit(jobs, ORDER.index(fault) * 100)
            recovery = RUNS[fault](stack, ids, wait)
            tallies.append(stack.settle(fault, ids, wait))
            tallies[-1].recovery_seconds = recovery
    finally:
        stack.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4, help="jobs per fault (default 4)")
    parser.add_argument("--quick", action="store_true", help="one job per fault, shorter waits")
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    args = parser.parse_args()
    jobs = 1 if args.quick else args.jobs
    wait = 60.0 if args.quick else 180.0

    from masactrl_core.tiny import write_tiny_checkpoint

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="masactrl-chaos-"))
    steps = STEPS // 2 if args.quick else STEPS
    checkpoint = write_tiny_checkpoint(workdir / "tiny")
    faults = [f for f in ORDER if f in args.faults]
    tallies: list[Tally] = []
    try:
        # One stack on a plain redis-server, one on Sentinel, each only if a fault needs it.
        for sentinel in (False, True):
            mine = [f for f in faults if (f in SENTINEL_FAULTS) == sentinel]
            if mine:
                home = workdir / ("sentinel" if sentinel else "plain")
                stack = Stack(home, checkpoint, steps, sentinel=sentinel)
                run_faults(stack, mine, jobs, wait, tallies)
    finally:
        print(f"machine: {machine()}")
        print(
            f"{jobs} job(s) per fault: tiny checkpoint, 64x64, {steps} steps with a "
            f"{STEP_DELAY_SECONDS:g} s step delay; lease {RECOVERY_SECONDS / 2:g} s; "
            "2 GPU workers, 1 webhook worker, redis-server with AOF (redis_failover: 1 primary, "
            "1 replica, 3 sentinels, down after 1 s), file storage"
        )
        print_table(tallies, started)
        if args.keep:
            print(f"logs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = len(tallies) < len(args.faults) or any(t.lost or t.run_twice for t in tallies)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
