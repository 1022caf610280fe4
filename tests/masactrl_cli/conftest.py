"""A real local stack (``masactrl up`` in a temporary folder, on private ports), shared by the
client and stack tests, and always torn down: by ``masactrl down``, then by killing any process
group it ever recorded that is still alive."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from masactrl_cli.stack import SERVICES
from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
UP_TIMEOUT = 240  # writing the tiny checkpoint and importing torch on a busy 2-core machine


def stack_environment(root: Path, **extra: str) -> dict[str, str]:
    """A clean environment for ``masactrl up`` in ``root``, with private ports."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": str(root),
        "HF_HUB_OFFLINE": "1",
        # Never the shared Redis on 6379, never the developer's port 8000.
        "MASACTRL_STACK_PORT": str(free_port()),
        "MASACTRL_STACK_REDIS_PORT": str(free_port()),
        "MASACTRL_STACK_STOP_TIMEOUT_SECONDS": "10",
        # Passed on to the worker: one torch thread on a shared machine.
        "MASACTRL_TORCH_THREADS": "1",
        # The random tiny checkpoint (written in seconds, with a ControlNet); the demo test asks
        # for the stack's real default, the committed toy-world model.
        "MASACTRL_MODEL": "tiny",
        **extra,
    }


def masactrl(
    root: Path, env: dict[str, str], *args: str, timeout: float = UP_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as its own process in ``root``."""
    return subprocess.run(
        [sys.executable, "-m", "masactrl_cli.main", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` names a running process (a zombie has ended)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_groups(pids: set[int]) -> None:
    """SIGKILL the process group of every pid that is still alive (the test's safety net)."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@dataclass
class StackRun:
    """A stack started by ``masactrl up`` in ``root``."""

    root: Path
    env: dict[str, str]
    seen: set[int] = field(default_factory=set)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['MASACTRL_STACK_PORT']}"

    @property
    def api_key(self) -> str:
        return (self.root / "var/dev-api-key").read_text().strip()

    def run(self, *args: str, timeout: float = UP_TIMEOUT) -> subprocess.CompletedProcess[str]:
        result = masactrl(self.root, self.env, *args, timeout=timeout)
        self.pids()
        return result

    def pids(self) -> dict[str, int]:
        """The pid files as they are now (and remember every pid for the cleanup)."""
        found = {}
        for name in SERVICES:
            path = self.root / "var/run" / f"{name}.pid"
            if path.exists():
                found[name] = int(path.read_text())
        self.seen.update(found.values())
        return found


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackRun]:
    """``masactrl up`` on the defaults (tiny checkpoint written by the stack itself)."""
    root = tmp_path_factory.mktemp("stack")
    stack = StackRun(root, stack_environment(root))
    try:
        result = stack.run("up")
        assert result.returncode == 0, result.stdout + result.stderr + _logs(root)
        yield stack
    finally:
        masactrl(root, stack.env, "down", timeout=60)
        kill_groups(stack.seen | set(stack.pids().values()))


def _logs(root: Path) -> str:
    parts = []
    for log in sorted((root / "var/log").glob("*.log")):
        parts.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return "\n".join(parts)
