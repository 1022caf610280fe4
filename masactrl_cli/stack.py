"""``masactrl up`` / ``masactrl down``: the whole service on one machine, for trying it by hand.

``up`` starts, in the background and each in its own process group:

- ``redis``: a redis-server on 127.0.0.1 (AOF on, data in var/redis), unless
  ``MASACTRL_REDIS_URL`` is set and answers;
- ``gateway``: ``masactrl serve`` on 127.0.0.1:8000;
- ``worker``: ``masactrl worker`` for the offline tiny checkpoint (var/models/tiny-sd, written if
  absent), or for ``MASACTRL_MODEL=<hub id, folder or catalog name>``;
- ``webhooks``: ``masactrl worker --webhooks``;

all in development mode with ``file://`` storage under var/storage, a dev API key
(var/dev-api-key) and the dev tenant's webhook secret (var/dev-webhook-secret), and loopback
webhook receivers allowed. It returns once ``/readyz`` answers 200 and ``GET /v1/models`` shows a
live worker for the model. Pids go to var/run/<name>.pid, logs to var/log/<name>.log. Run it again
and it starts only what is not running. ``down`` stops exactly the processes ``up`` recorded.

Why the stack's own Redis unless one is configured explicitly: the default URL
(127.0.0.1:6379) is often a Redis that other projects share, and two stacks on one Redis would
take each other's jobs from the same queue while writing to different storage folders.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from masactrl_cli.errors import UsageError

__all__ = [
    "SERVICES",
    "LocalStack",
    "StackError",
    "StackPaths",
    "StackSettings",
    "catalog_entry",
    "configure",
    "load_stack_settings",
    "run",
]

SERVICES = ("redis", "gateway", "worker", "webhooks")
_APP_SERVICES = ("gateway", "worker", "webhooks")
DEFAULT_TINY_MODEL = Path("models/tiny-sd")  # under the stack's var/ folder
# The tiny checkpoint (masactrl_core.tiny): 64 px native, VAE factor 2 and three UNet
# downsamplers, so sides are multiples of 16. Written here because importing the engine would
# import torch.
_TINY_ENTRY = {"family": "sd", "native_width": 64, "native_height": 64, "size_multiple": 16}
_BUILTIN_MODELS = {
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd"),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
}
_POLL_SECONDS = 0.25


class StackError(Exception):
    """The stack could not be started or stopped; one line that says why and where to look."""


class StackSettings(BaseSettings):
    """Settings of ``masactrl up`` / ``down`` / ``demo`` (``MASACTRL_STACK_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="MASACTRL_STACK_",
        env_file=".env",
        extra="ignore",
        populate_by_name=True,
    )

    port: int = Field(8000, ge=1, le=65535, description="Port of the gateway on 127.0.0.1.")
    redis_port: int = Field(
        6380, ge=1, le=65535, description="Port of the redis-server the stack starts itself."
    )
    dir: Path = Field(Path("var"), description="Folder for pids, logs, storage, keys and Redis.")
    start_timeout_seconds: float = Field(
        900, gt=0, description="How long `up` waits for the stack (loading real weights is slow)."
    )
    stop_timeout_seconds: float = Field(
        15, gt=0, description="Grace after SIGTERM before `down` sends SIGKILL."
    )
    # Shared names, read without the MASACTRL_STACK_ prefix.
    redis_url: str | None = Field(
        None,
        validation_alias="MASACTRL_REDIS_URL",
        description="A Redis to use instead of starting one, when it answers.",
    )
    model: str | None = Field(
        None,
        validation_alias="MASACTRL_MODEL",
        description="Hub id, diffusers folder or catalog name; default: the tiny checkpoint.",
    )


def load_stack_settings(**overrides: Any) -> StackSettings:
    """The settings from the environment (and .env); a bad value is a UsageError."""
    try:
        return StackSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"MASACTRL_STACK_{str(e['loc'][0]).upper()}: {e['msg']}" if e["loc"] else e["msg"]
            for e in exc.errors(include_url=False)
        )
        raise UsageError(f"invalid configuration: {problems}") from None


@dataclass(frozen=True)
class StackPaths:
    """Where everything of one stack lives (all under ``var``)."""

    var: Path

    @property
    def run(self) -> Path:
        return self.var / "run"

    @property
    def logs(self) -> Path:
        return self.var / "log"

    @property
    def storage(self) -> Path:
        return self.var / "storage"

    @property
    def redis(self) -> Path:
        return self.var / "redis"

    @property
    def tiny_model(self) -> Path:
        return self.var / DEFAULT_TINY_MODEL

    @property
    def catalog(self) -> Path:
        return self.var / "catalog.json"

    @property
    def api_key(self) -> Path:
        return self.var / "dev-api-key"

    @property
    def webhook_secret(self) -> Path:
        return self.var / "dev-webhook-secret"

    @property
    def signing_secret(self) -> Path:
        return self.var / "url-signing-secret"

    @property
    def state(self) -> Path:
        return self.run / "stack.json"

    def pid_file(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"


# --- the model ------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-_.")[:63]
    return slug or "custom"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _folder_entry(folder: Path) -> dict[str, Any]:
    """Family and sizes from a diffusers folder's configs (family defaults otherwise)."""
    index = _read_json(folder / "model_index.json")
    family = "sdxl" if "XL" in str(index.get("_class_name", "")) else "sd"
    entry: dict[str, Any] = {"family": family}
    unet, vae = _read_json(folder / "unet/config.json"), _read_json(folder / "vae/config.json")
    vae_blocks, unet_blocks = vae.get("block_out_channels"), unet.get("down_block_types")
    sample = unet.get("sample_size")
    if isinstance(vae_blocks, list) and isinstance(unet_blocks, list) and isinstance(sample, int):
        vae_factor = 2 ** (len(vae_blocks) - 1)
        entry["native_width"] = entry["native_height"] = sample * vae_factor
        # The UNet halves the latent once per down block but the last.
        entry["size_multiple"] = vae_factor * 2 ** (len(unet_blocks) - 1)
    return entry


def catalog_entry(model: str | None, tiny_model: Path) -> dict[str, Any]:
    """The catalog entry the stack serves: the tiny checkpoint, or ``model`` with a family/size.

    ``model`` is a built-in catalog name (``sd15``, ``sdxl``), a local diffusers folder (family and
    native size read from its configs) or a hub id (family from the name: ``xl`` means SDXL;
    SD 2.x non-base checkpoints are 768 px).
    """
    if not model:
        return {"name": "tiny", "source": str(tiny_model.resolve()), **_TINY_ENTRY}
    model = model.strip()
    if model in _BUILTIN_MODELS:
        source, family = _BUILTIN_MODELS[model]
        return {"name": model, "source": source, "family": family}
    for name, (source, family) in _BUILTIN_MODELS.items():
        if model == source:
            return {"name": name, "source": source, "family": family}
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise StackError(f"MASACTRL_MODEL={model} is a folder without model_index.json")
        return {
            "name": _slug(folder.resolve().name),
            "source": str(folder.resolve()),
            **_folder_entry(folder),
        }
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise StackError(f"MASACTRL_MODEL={model}: no such folder (and not a hub id)")
    lowered = model.lower()
    entry: dict[str, Any] = {
        "name": _slug(model.rsplit("/", 1)[-1]),
        "source": model,
        "family": "sdxl" if "xl" in lowered else "sd",
    }
    if re.search(r"stable-diffusion-2(?!.*base)", lowered):
        entry["native_width"] = entry["native_height"] = 768
    return entry


# --- processes ----------------------------------------------------------------------------------


def process_token(pid: int) -> str | None:
    """An identity of a live process (its start time), or ``None`` if gone or a zombie.

    Stored next to each pid so that a pid the system reused for something else is never signalled.
    """
    if pid <= 0:
        return None
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            text = stat.read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2 :].split()
        # fields[0] is the state (field 3 of proc(5)), fields[19] the start time (field 22).
        return None if fields[0] in ("Z", "X") else fields[19]
    # No /proc (macOS): ps prints the state and the start time.
    result = subprocess.run(
        ["ps", "-o", "stat=,lstart=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    line = result.stdout.strip()
    if result.returncode != 0 or not line or line.startswith("Z"):
        return None
    return line.split(None, 1)[-1]


def _reap(pid: int) -> None:
    # Processes started by this very process (demo, tests) stay zombies until waited for.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        # Like uvicorn and redis: connections in TIME_WAIT do not block a new listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)\w*: ")


def _failure_line(path: Path) -> str:
    """The most telling line of a process's log since its last start: the final exception of a
    traceback, else the last error record, else the last line."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    start = max((k for k, line in enumerate(lines) if line.startswith("=== ")), default=-1)
    lines = [line.strip() for line in lines[start + 1 :] if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return line[:300]
    for line in reversed(lines):
        if line.startswith(("ERROR", "CRITICAL")) or " ERROR " in line or " CRITICAL " in line:
            return line[:300]
    return lines[-1][:300] if lines else ""


def _write_secret(path: Path, make: Callable[[], str]) -> str:
    """Read ``path``, or create it (mode 0600) with ``make()`` the first time."""
    try:
        value = path.read_text(encoding="utf-8").strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # an empty file left by an interrupted run
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    return value


def _redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False
    finally:
        client.close()


def _display(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


class LocalStack:
    """One machine's stack, rooted at ``settings.dir`` (relative to the current directory)."""

    def __init__(
        self, settings: StackSettings | None = None, *, say: Callable[[str], None] = print
    ) -> None:
        self.settings = settings or load_stack_settings()
        self.paths = StackPaths(self.settings.dir)
        self.say = say
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- what is where -------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def api_key(self) -> str:
        """The dev API key (created on first use)."""
        return _write_secret(self.paths.api_key, lambda: "mctl_dev_" + secrets.token_urlsafe(24))

    @property
    def webhook_secret(self) -> str:
        """The dev tenant's Standard Webhooks secret (created on first use)."""
        return _write_secret(
            self.paths.webhook_secret,
            lambda: "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
        )

    def _state(self) -> dict[str, Any]:
        return _read_json(self.paths.state)

    def _save_state(self, state: dict[str, Any]) -> None:
        self.paths.run.mkdir(parents=True, exist_ok=True)
        tmp = self.paths.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.paths.state)

    def pid(self, name: str) -> int | None:
        """The recorded pid of ``name`` if that process is alive and is the one ``up`` started."""
        try:
            pid = int(self.paths.pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None
        _reap(pid)
        token = process_token(pid)
        if token is None:
            return None
        # Without a matching record (start time) the pid may have been reused: never ours.
        recorded = self._state().get("processes", {}).get(name) or {}
        return pid if recorded.get("pid") == pid and recorded.get("token") == token else None

    def running(self) -> dict[str, int]:
        """Name -> pid of each stack process that is alive."""
        return {name: pid for name in SERVICES if (pid := self.pid(name)) is not None}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two `up`s (or an `up` and a `down`) at once would start everything twice.
        self.paths.run.mkdir(parents=True, exist_ok=True)
        with (self.paths.run / "stack.lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say(f"waiting for another `masactrl up`/`down` on {_display(self.paths.var)}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- up --------------------------------------------------------------------------------------

    def up(self) -> list[str]:
        """Start what is not running, wait until the stack serves jobs; returns what it started."""
        with self._locked():
            started: list[str] = []
            try:
                self._up(started)
            except BaseException:
                # A half-started stack is worse than none: stop what this call started.
                if started:
                    self.say(f"stopping what this run started: {', '.join(started)}")
                    self._stop(started)
                raise
            return started

    def _up(self, started: list[str]) -> None:
        begin = time.monotonic()
        settings, paths = self.settings, self.paths
        for folder in (paths.run, paths.logs, paths.storage, paths.redis):
            folder.mkdir(parents=True, exist_ok=True)
        entry = catalog_entry(settings.model, paths.tiny_model)
        state = self._state()
        alive = self.running()
        redis_url, own_redis = self._choose_redis(alive, state)
        config = {"port": settings.port, "redis_url": redis_url, "model": entry}
        if alive and state.get("config") not in (None, config):
            # Mixing old and new settings would leave, e.g., a worker for another model.
            running = state["config"]
            changes = [
                f"{what} {running[key]!s} (now asked for {config[key]!s})"
                for what, key in (("port", "port"), ("Redis", "redis_url"))
                if running.get(key) != config[key]
            ]
            if running.get("model") != entry:
                old_model = (running.get("model") or {}).get("source")
                changes.append(f"model {old_model} (now asked for {entry['source']})")
            raise StackError(
                f"the stack in {_display(paths.var)} runs with {', '.join(changes)}; "
                "run `make down` first to change it"
            )
        processes = state.get("processes", {})
        for name in SERVICES:
            if name not in alive:
                processes.pop(name, None)
                with contextlib.suppress(FileNotFoundError):
                    self.paths.pid_file(name).unlink()  # left by a process that died
        self._save_state({"config": config, "processes": processes})

        if "gateway" not in alive and _port_in_use(settings.port):
            raise StackError(
                f"port {settings.port} is in use by another program (not this stack's gateway); "
                "stop it, or pick another port with MASACTRL_STACK_PORT=<port>"
            )
        if own_redis and "redis" not in alive:
            self._start_redis(started)
        elif "redis" in alive:
            self.say(f"{'redis':<9} running  pid {alive['redis']}")
        if "worker" not in alive and entry["name"] == "tiny":
            self._ensure_tiny_model()
        paths.catalog.write_text(json.dumps({"default": entry["name"], "models": [entry]}) + "\n")

        env = self._environment(redis_url, entry["name"])
        python = [sys.executable, "-m", "masactrl_cli.main"]
        commands = {
            "gateway": [*python, "serve", "--host", "127.0.0.1", "--port", str(settings.port)],
            "worker": [*python, "worker", "--model", entry["name"]],
            "webhooks": [*python, "worker", "--webhooks"],
        }
        before = self._worker_ids(redis_url, entry["name"])
        for name in _APP_SERVICES:
            if name in alive:
                self.say(f"{name:<9} running  pid {alive[name]}")
                continue
            pid = self._spawn(name, commands[name], env)
            started.append(name)
            detail = {
                "gateway": self.api_url,
                "worker": f"model {entry['name']} ({entry['source']})",
                "webhooks": "",
            }[name]
            self.say(f"{name:<9} started  pid {pid}  {detail}".rstrip())
        self._wait_ready([*started, *alive], redis_url, entry["name"], before, "worker" in started)
        self.say(f"ready in {time.monotonic() - begin:.1f} s")

    def _choose_redis(self, alive: dict[str, int], state: dict[str, Any]) -> tuple[str, bool]:
        """The Redis URL to use and whether it is the stack's own redis-server."""
        own_url = f"redis://127.0.0.1:{self.settings.redis_port}/0"
        configured = self.settings.redis_url
        if configured and configured != own_url:
            if _redis_answers(configured):
                return configured, False
            self.say(
                f"MASACTRL_REDIS_URL ({configured}) does not answer; starting a redis-server on "
                f"127.0.0.1:{self.settings.redis_port} instead"
            )
        previous = (state.get("config") or {}).get("redis_url")
        if alive.keys() - {"redis"} and configured and previous == configured:
            raise StackError(
                f"the running stack uses Redis at {previous}, which no longer answers; "
                "run `make down`, then `make up` again"
            )
        return own_url, True

    def _start_redis(self, started: list[str]) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError(
                "redis-server is not installed and no MASACTRL_REDIS_URL answers; install it "
                "with `sudo apt-get install redis-server` (Debian/Ubuntu) or `brew install redis` "
                "(macOS), or set MASACTRL_REDIS_URL to a running Redis"
            )
        port = self.settings.redis_port
        if _port_in_use(port):
            raise StackError(
                f"port {port} is in use by another program (not this stack's Redis); stop it, "
                "or pick another port with MASACTRL_STACK_REDIS_PORT=<port>"
            )
        command = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(self.paths.redis.resolve()),
            # AOF keeps queued jobs across a restart, as in docker-compose; no RDB snapshots.
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        pid = self._spawn("redis", command, dict(os.environ))
        started.append("redis")
        self.say(f"{'redis':<9} started  pid {pid}  redis://127.0.0.1:{port}/0")
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 20
        while not _redis_answers(url):
            self._check_alive(["redis"])
            if time.monotonic() > deadline:
                raise StackError(
                    f"redis-server does not answer on port {port}; see "
                    f"{_display(self.paths.log_file('redis'))}"
                )
            time.sleep(_POLL_SECONDS)

    def _ensure_tiny_model(self) -> None:
        folder = self.paths.tiny_model
        if (folder / "model_index.json").is_file():
            return
        self.say(f"writing the offline tiny checkpoint to {_display(folder)}")
        result = subprocess.run(
            [sys.executable, "-m", "masactrl_cli.main", "tiny-model", str(folder)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise StackError(f"cannot write the tiny checkpoint: {reason}")

    def _environment(self, redis_url: str, model: str) -> dict[str, str]:
        paths = self.paths
        signing = _write_secret(paths.signing_secret, lambda: secrets.token_urlsafe(32))
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("MASACTRL_STACK_")
            and name not in ("MASACTRL_API_URL", "MASACTRL_API_KEY")
        }
        env.update(
            {
                "MASACTRL_ENVIRONMENT": "development",
                "MASACTRL_REDIS_URL": redis_url,
                "MASACTRL_STORAGE_URL": paths.storage.resolve().as_uri(),
                "MASACTRL_URL_SIGNING_SECRET": signing,
                "MASACTRL_PUBLIC_BASE_URL": self.api_url,
                "MASACTRL_CATALOG_FILE": str(paths.catalog.resolve()),
                # Blank beats a MASACTRL_CATALOG in a .env file ("set one of the two at most").
                "MASACTRL_CATALOG": "",
                "MASACTRL_MODEL": model,
                "MASACTRL_DEV_API_KEY": self.api_key,
                "MASACTRL_DEV_WEBHOOK_SECRET": self.webhook_secret,
                # Development only (refused in production): a developer's own webhook receiver.
                "MASACTRL_ALLOW_LOOPBACK_HTTP": "true",
                "PYTHONUNBUFFERED": "1",
            }
        )
        # Where s3:// model sources are downloaded: inside the stack's folder, like the rest.
        env.setdefault("MASACTRL_MODEL_CACHE_DIR", str((paths.var / "models").resolve()))
        if model == "tiny":
            env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> int:
        log_path = self.paths.log_file(name)
        with log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== {stamp} masactrl up: {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command,
                cwd=Path.cwd(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl-C in this terminal does not reach it, and `down` can signal
                # the whole group (a Celery worker's pool child included).
                start_new_session=True,
            )
        self._children[process.pid] = process
        token = process_token(process.pid)
        state = self._state()
        state.setdefault("processes", {})[name] = {"pid": process.pid, "token": token}
        self._save_state(state)
        self.paths.pid_file(name).write_text(f"{process.pid}\n")
        return process.pid

    def _check_alive(self, names: Iterable[str]) -> None:
        for name in names:
            if self.pid(name) is None:
                log = self.paths.log_file(name)
                last = _failure_line(log)
                raise StackError(
                    f"{name} exited during start-up"
                    + (f" ({last})" if last else "")
                    + f"; see {_display(log)}"
                )

    def _worker_ids(self, redis_url: str, model: str) -> set[str]:
        """Worker ids with a fresh heartbeat for ``model`` (empty if Redis is not up yet)."""
        import redis

        from masactrl_jobs.store import Keys

        client = redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2)
        try:
            members = client.zrangebyscore(Keys().workers(model), time.time(), "+inf")
        except (redis.RedisError, OSError):
            return set()
        finally:
            client.close()
        return {member.decode() for member in members}

    def _wait_ready(
        self,
        watched: list[str],
        redis_url: str,
        model: str,
        workers_before: set[str],
        new_worker: bool,
    ) -> None:
        """Until /readyz is 200 and the model is live (through a new worker, if one started)."""
        import httpx

        if new_worker:
            self.say(
                f"waiting for the worker to load {model} "
                f"(log: {_display(self.paths.log_file('worker'))})"
            )
        deadline = time.monotonic() + self.settings.start_timeout_seconds
        headers = {"Authorization": f"Bearer {self.api_key}"}
        waiting_for = "the gateway"
        with httpx.Client(base_url=self.api_url, headers=headers, timeout=5) as http:
            while True:
                self._check_alive(watched)
                try:
                    if http.get("/readyz").status_code != 200:
                        waiting_for = "the gateway's /readyz"
                    else:
                        waiting_for = f"a live worker for {model}"
                        answer = http.get("/v1/models")
                        if answer.status_code == 401:
                            raise StackError(
                                f"the running gateway refuses the key in "
                                f"{_display(self.paths.api_key)} (was it replaced?); run "
                                "`make down`, then `make up`"
                            )
                        models = answer.json().get("data", [])
                        live = any(m.get("name") == model and m.get("live") for m in models)
                        # A worker killed moments ago still looks live until its heartbeat
                        # expires; the one this run started must have registered itself.
                        fresh = not new_worker or bool(
                            self._worker_ids(redis_url, model) - workers_before
                        )
                        if live and fresh:
                            return
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise StackError(
                        f"timed out after {self.settings.start_timeout_seconds:g} s waiting for "
                        f"{waiting_for}; see the logs in {_display(self.paths.logs)}"
                    )
                time.sleep(_POLL_SECONDS)

    # -- down ------------------------------------------------------------------------------------

    def down(self, names: Iterable[str] | None = None) -> list[str]:
        """Stop the recorded processes (all, or ``names``); returns the names it stopped."""
        with self._locked():
            return self._stop(list(names) if names is not None else list(SERVICES))

    def _stop(self, names: list[str]) -> list[str]:
        stopped: list[str] = []
        # Applications first, Redis last, so nothing logs a lost connection on the way down.
        for group in (
            [n for n in _APP_SERVICES if n in names],
            ["redis"] if "redis" in names else [],
        ):
            targets: dict[str, int] = {}
            for name in group:
                pid_file = self.paths.pid_file(name)
                if not pid_file.exists():
                    continue
                pid = self.pid(name)
                if pid is None:
                    self.say(f"{name:<9} not running (removed its stale pid file)")
                    self._forget(name)
                    continue
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
                targets[name] = pid
            self._wait_gone(targets)
            for name, pid in targets.items():
                self.say(f"{name:<9} stopped  pid {pid}")
                self._forget(name)
                stopped.append(name)
        return stopped

    def _wait_gone(self, targets: dict[str, int]) -> None:
        deadline = time.monotonic() + self.settings.stop_timeout_seconds
        tokens = {pid: process_token(pid) for pid in targets.values()}
        remaining = dict(targets)
        while remaining:
            for name, pid in list(remaining.items()):
                self._poll_child(pid)
                if process_token(pid) != tokens[pid]:
                    del remaining[name]
            if not remaining:
                break
            if time.monotonic() > deadline:
                for name, pid in remaining.items():
                    grace = self.settings.stop_timeout_seconds
                    self.say(f"{name:<9} did not stop within {grace:g} s; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.05)
        for pid in targets.values():
            # The leader is gone; a pool child it left behind goes with its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def _poll_child(self, pid: int) -> None:
        child = self._children.get(pid)
        if child is not None:
            child.poll()
        else:
            _reap(pid)

    def _forget(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.paths.pid_file(name).unlink()
        state = self._state()
        state.get("processes", {}).pop(name, None)
        if state.get("processes"):
            self._save_state(state)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.paths.state.unlink()

    # -- what to tell the user -------------------------------------------------------------------

    def summary(self) -> list[str]:
        """How to use the running stack, a few lines."""
        key_file, secret_file = _display(self.paths.api_key), _display(self.paths.webhook_secret)
        masactrl = _display(Path(sys.executable).with_name("masactrl"))
        lines = [
            f"gateway:  {self.api_url}   API docs: {self.api_url}/docs",
            f"API key:  {self.api_key}   (saved in {key_file})",
            f"webhooks: signed with the dev secret in {secret_file}; http://127.0.0.1 receivers "
            "allowed",
            f"logs:     {_display(self.paths.logs)}/<name>.log   pids: {_display(self.paths.run)}",
        ]
        if self.settings.port != 8000:
            lines.append(f"client:   export MASACTRL_API_URL={self.api_url}")
        lines += [
            f'try:      {masactrl} client synthesize --source-prompt "a cat sitting" '
            '--target-prompt "a cat running" --steps 20 --out out/try',
            "stop:     make down",
        ]
        return lines


# --- the subcommands --------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    """``up`` and ``down`` share the location options; ``up`` adds the start-up timeout."""
    parser.add_argument(
        "--dir", type=Path, help="stack folder (default: MASACTRL_STACK_DIR or ./var)"
    )
    if command == "up":
        parser.add_argument(
            "--port", type=int, help="gateway port (default: MASACTRL_STACK_PORT or 8000)"
        )
        parser.add_argument(
            "--redis-port", type=int, help="port of the stack's own redis-server (default 6380)"
        )
        parser.add_argument(
            "--timeout", type=float, help="seconds to wait for a live worker (default 900)"
        )
    else:
        parser.add_argument(
            "--timeout", type=float, help="grace after SIGTERM before SIGKILL (default 15 s)"
        )


def settings_from_args(args: argparse.Namespace) -> StackSettings:
    """Stack settings with the command line's options on top of the environment's."""
    timeout_field = "start_timeout_seconds" if args.command == "up" else "stop_timeout_seconds"
    return load_stack_settings(
        dir=args.dir,
        port=getattr(args, "port", None),
        redis_port=getattr(args, "redis_port", None),
        **{timeout_field: args.timeout},
    )


def run(args: argparse.Namespace) -> int:
    """``up``: start and wait, then print how to use it. ``down``: stop what ``up`` started."""
    # Line by line, so that status lines and the progress bars on stderr interleave in a log.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    stack = LocalStack(settings_from_args(args))
    try:
        if args.command == "up":
            stack.up()
            for line in stack.summary():
                print(line)
        else:
            if not stack.down():
                print(f"nothing to stop in {_display(stack.paths.var)}")
    except StackError as exc:
        print(f"masactrl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
