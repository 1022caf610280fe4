"""A Sentinel-managed Redis on loopback: one primary, one replica, three sentinels.

Shared by the store's failover tests and ``bench/chaos.py`` (its ``redis_failover`` fault). Every
process is the Debian ``redis-server`` binary (sentinels run it with ``--sentinel``), so nothing
beyond what the other tests need is installed. Timings are short so a failover completes in a few
seconds: a primary is down after 1 s of silence, and two of the three sentinels must agree.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from masactrl_jobs.store.connection import RedisTarget

MASTER_NAME = "masactrl"
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not happen within {timeout:g} s")


def _sentinel_id(port: int) -> str:
    return f"{port:040x}"


@dataclass
class SentinelCluster:
    """The processes, their ports, and what the settings need to reach them."""

    workdir: Path
    # One password for the data nodes and the sentinels (as in the compose `ha` profile), or none.
    password: str | None = None
    data_ports: list[int] = field(default_factory=list)  # [first primary, first replica]
    sentinel_ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def sentinels(self) -> str:
        """``MASACTRL_REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    @property
    def url(self) -> str:
        """``MASACTRL_REDIS_URL`` (its host and port are ignored once sentinels are set)."""
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:1/0"

    def environment(self) -> dict[str, str]:
        env = {
            "MASACTRL_REDIS_URL": self.url,
            "MASACTRL_REDIS_SENTINELS": self.sentinels,
            "MASACTRL_REDIS_SENTINEL_MASTER": MASTER_NAME,
        }
        if self.password:
            env["MASACTRL_REDIS_SENTINEL_PASSWORD"] = self.password
        return env

    def target(self) -> RedisTarget:
        """The store's way to this cluster, as ``CommonSettings.redis_target`` would build it."""
        from masactrl_jobs.settings import parse_sentinels
        from masactrl_jobs.store.connection import RedisTarget

        return RedisTarget(
            self.url,
            sentinels=parse_sentinels(self.sentinels),
            sentinel_master=MASTER_NAME,
            sentinel_password=self.password,
            wait_replicas=1,
        )

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, port: int, args: list[str]) -> None:
        log = (self.workdir / f"redis-{port}.log").open("ab")
        self.processes[port] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )

    def _data_node(self, port: int, replica_of: int | None) -> None:
        data = self.workdir / f"data-{port}"
        data.mkdir(exist_ok=True)
        args = [shutil.which("redis-server") or "redis-server", "--port", str(port)]
        args += ["--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes", "--save", ""]
        # A replica syncs at once rather than after the default 5 s wait for more replicas.
        args += ["--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        self._spawn(port, args)

    def _sentinel(self, port: int, primary: int, replica: int) -> None:
        # Sentinel rewrites its configuration file as it learns: one writable file each. The
        # replica and the other sentinels are written in (by id) rather than discovered, which
        # takes up to ten seconds of INFO polling and hello messages.
        conf = self.workdir / f"sentinel-{port}.conf"
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {self.workdir}",
            f"sentinel myid {_sentinel_id(port)}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} {QUORUM}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
            f"sentinel known-replica {MASTER_NAME} 127.0.0.1 {replica}",
        ]
        lines += [
            f"sentinel known-sentinel {MASTER_NAME} 127.0.0.1 {other} {_sentinel_id(other)}"
            for other in self.sentinel_ports
            if other != port
        ]
        if self.password:
            lines += [f"sentinel auth-pass {MASTER_NAME} {self.password}"]
            lines += [f"requirepass {self.password}"]
        conf.write_text("\n".join(lines) + "\n")
        self._spawn(port, [shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"])

    def start(self, timeout: float = 30.0) -> None:
        """Start every process and wait until the sentinels know the replica and each other."""
        primary, replica = self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._data_node(primary, None)
        self._data_node(replica, primary)
        for port in self.sentinel_ports:
            self._sentinel(port, primary, replica)
        _wait_for(self.ready, timeout, "the Sentinel cluster forming")

    def ready(self) -> bool:
        """Each sentinel sees a master, its in-sync replica and the two other sentinels."""
        for port in self.sentinel_ports:
            sentinel = self._sentinel_client(port)
            try:
                state = sentinel.sentinel_master(MASTER_NAME)
            finally:
                sentinel.close()
            if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                return False
        master = self.master_port()
        client = self.data_client(master)
        try:
            info = client.info("replication")
        finally:
            client.close()
        return bool(info.get("connected_slaves")) and info["slave0"]["state"] == "online"

    def master_port(self, sentinel_port: int | None = None) -> int:
        """The master's port, as one sentinel (the first by default) reports it."""
        client = self._sentinel_client(sentinel_port or self.sentinel_ports[0])
        try:
            _, port = client.sentinel_get_master_addr_by_name(MASTER_NAME)
        finally:
            client.close()
        return int(port)

    def kill_master(self) -> int:
        """SIGKILL the current master (no shutdown, no last write); its port."""
        port = self.master_port()
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        return port

    def wait_for_failover(self, old_master: int, timeout: float = 30.0) -> int:
        """Wait until every sentinel names a master other than ``old_master``; its port."""

        def moved() -> bool:
            ports = {self.master_port(port) for port in self.sentinel_ports}
            return len(ports) == 1 and old_master not in ports

        _wait_for(moved, timeout, "Sentinel promoting the replica")
        return self.master_port()

    def stop(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        for process in self.processes.values():
            process.wait(10)
        self.processes.clear()

    def _sentinel_client(self, port: int) -> Any:  # redis.Redis; its replies are loosely typed
        import redis

        return redis.Redis(
            port=port, password=self.password, socket_timeout=1, decode_responses=True
        )

    def data_client(self, port: int) -> Any:
        """A plain client of one data node (to look behind the store's back)."""
        import redis

        return redis.Redis(
            port=port, password=self.password, socket_timeout=1, decode_responses=True
        )
