"""``masactrl up`` / ``masactrl down``: the whole service on one machine, for trying it by hand.

``up`` starts, in the background and each in a session of its own (Ctrl-C in the terminal does
not reach them):

- ``redis``: a redis-server on 127.0.0.1 (AOF on, data in var/redis), unless
  ``MASACTRL_REDIS_URL`` is set and answers;
- ``gateway``: ``masactrl serve`` on 127.0.0.1:8000;
- ``worker``: ``masactrl worker`` for the default model, the committed toy-world checkpoint, or
  for ``MASACTRL_MODEL``;
- ``worker-tiny``: a second ``masactrl worker``, for the random tiny checkpoint served beside the
  toy one (its ControlNet runs layouts and sequences); none when ``MASACTRL_MODEL`` names a model,
  since the stack then serves that one alone;
- ``webhooks``: ``masactrl worker --webhooks``;

in the development environment that :mod:`masactrl_cli.devenv` prepares (keys, model, catalog,
storage). It returns once ``/readyz`` answers 200 and ``GET /v1/models`` shows a live worker for
every model (the workers load theirs in parallel). Run it again and it starts only what is not
running. ``down`` stops exactly the processes ``up`` started.

How a process is known to be ours: ``up`` records each one as its pid and its creation time
(psutil's ``create_time``) in var/run/stack.json, and repeats the pid in var/run/<name>.pid for
people and shell scripts. A process counts as the stack's only while both match, so a pid the
system has since given to another program is never signalled. Stopping takes the recorded process
with its descendants (a Celery worker's pool children): SIGTERM to all, ``stop_timeout_seconds``
of grace (the worker finishes its running job), SIGKILL to the survivors.

Why the stack's own Redis unless one is configured explicitly: the default URL
(127.0.0.1:6379) is often a Redis that other projects share, and two stacks on one Redis would
take each other's jobs from the same queue while writing to different storage folders.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from masactrl_cli.devenv import DevEnv, catalog_entries, display_path
from masactrl_cli.errors import StackError, UsageError

__all__ = [
    "SERVICES",
    "LocalStack",
    "Processes",
    "StackSettings",
    "configure",
    "load_stack_settings",
    "run",
]

SERVICES = ("redis", "gateway", "worker", "worker-tiny", "webhooks")
_APPS = ("gateway", "worker", "worker-tiny", "webhooks")
_POLL_SECONDS = 0.25
# A creation time is the boot time plus the ticks since boot, and the boot time psutil reads moves
# a little when NTP adjusts the clock. Another process with our pid started within a second of ours
# would need ours to exit and the pid space to wrap around within that second.
_SAME_START_SECONDS = 1.0


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
        description="Hub id, diffusers folder or catalog name to serve alone; default: the toy "
        "checkpoint and the tiny one beside it.",
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


# --- processes ------------------------------------------------------------------------------------

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


class Processes:
    """The named background processes of one stack: started, found again, stopped as trees.

    ``run/stack.json`` holds each one's pid and creation time, and the settings the stack runs
    with; ``run/<name>.pid`` repeats the pid; ``log/<name>.log`` takes its output.
    """

    def __init__(self, var: Path, say: Callable[[str], None]) -> None:
        self.var = var
        self.run_dir = var / "run"
        self.log_dir = var / "log"
        self._state_file = self.run_dir / "stack.json"
        self.say = say
        # Kept so that stopping a process this one started also reaps it.
        self._children: dict[int, psutil.Popen] = {}

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize ``up`` and ``down``: two at once would start everything twice."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "stack.lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say(f"waiting for another `masactrl up`/`down` on {display_path(self.var)}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- the state file ---------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        try:
            state = json.loads(self._state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def _save(self, state: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self._state_file)

    def config(self) -> dict[str, Any] | None:
        """The settings recorded by the ``up`` that started the running processes."""
        config = self._state().get("config")
        return config if isinstance(config, dict) else None

    def save_config(self, config: dict[str, Any]) -> None:
        self._save({**self._state(), "config": config})

    # -- finding ----------------------------------------------------------------------------------

    def find(self, name: str) -> psutil.Process | None:
        """The process ``up`` started as ``name``, if it is still alive."""
        record = self._state().get("processes", {}).get(name) or {}
        pid, created = record.get("pid"), record.get("create_time")
        if not isinstance(pid, int) or not isinstance(created, (int, float)):
            return None
        try:
            process = self._children.get(pid) or psutil.Process(pid)
            # Another creation time: the pid now belongs to another program.
            if abs(process.create_time() - created) > _SAME_START_SECONDS:
                return None
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return process

    def running(self) -> dict[str, psutil.Process]:
        """Each stack process that is alive, by name."""
        return {name: process for name in SERVICES if (process := self.find(name)) is not None}

    def forget(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pid_file(name).unlink()
        state = self._state()
        processes = state.get("processes", {})
        if name not in processes:
            return
        del processes[name]
        if processes:
            self._save(state)
        else:  # nothing runs: the recorded settings no longer bind the next `up`
            self._state_file.unlink()

    # -- starting and stopping --------------------------------------------------------------------

    def start(self, name: str, command: list[str], env: dict[str, str]) -> int:
        """Start ``command`` in the background as ``name``, logging to its log file; its pid."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file(name).open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"=== {stamp} masactrl up: {' '.join(command)}\n".encode())
            log.flush()
            child = psutil.Popen(
                command,
                cwd=Path.cwd(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Ctrl-C in this terminal must not reach it: `down` stops it, not the shell.
                start_new_session=True,
            )
        pid: int = child.pid
        self._children[pid] = child
        state = self._state()
        # psutil.Popen read the creation time at start, while the child was alive or unreaped.
        state.setdefault("processes", {})[name] = {"pid": pid, "create_time": child.create_time()}
        self._save(state)
        self.pid_file(name).write_text(f"{pid}\n")
        return pid

    def stop(self, names: Iterable[str], grace: float) -> list[str]:
        """Stop the named processes with their descendants and forget them; the names stopped."""
        targets: dict[str, psutil.Process] = {}
        for name in names:
            process = self.find(name)
            if process is None:
                if self.pid_file(name).exists():
                    self.say(f"{name:<9} not running (removed its stale pid file)")
                self.forget(name)
            else:
                targets[name] = process
        owners: dict[psutil.Process, str] = {}
        for name, process in targets.items():
            try:
                tree = [process, *process.children(recursive=True)]
            except psutil.Error:
                tree = [process]
            for member in tree:
                owners[member] = name
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.terminate()
        _, alive = psutil.wait_procs(list(owners), timeout=grace)
        for name in dict.fromkeys(owners[member] for member in alive):
            self.say(f"{name:<9} did not stop within {grace:g} s; killing it")
        for member in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        psutil.wait_procs(alive, timeout=5)
        for name, process in targets.items():
            self.say(f"{name:<9} stopped  pid {process.pid}")
            self.forget(name)
        return list(targets)


# --- the stack ------------------------------------------------------------------------------------


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        # Like uvicorn and redis: connections in TIME_WAIT do not block a new listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _redis_answers(url: str) -> bool:
    import redis

    from masactrl_jobs.store import JobStore

    try:
        store = JobStore.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    except ValueError:  # not a Redis URL
        return False
    try:
        return store.ping()
    except (redis.RedisError, OSError):
        return False
    finally:
        store.close()


class LocalStack:
    """One machine's stack, rooted at ``settings.dir`` (relative to the current directory)."""

    def __init__(
        self, settings: StackSettings | None = None, *, say: Callable[[str], None] = print
    ) -> None:
        self.settings = settings or load_stack_settings()
        self.devenv = DevEnv(self.settings.dir)
        self.processes = Processes(self.settings.dir, say)
        self.say = say

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def api_key(self) -> str:
        """The dev API key (created on first use)."""
        return self.devenv.api_key()

    def running(self) -> dict[str, int]:
        """Name -> pid of each stack process that is alive."""
        return {name: process.pid for name, process in self.processes.running().items()}

    # -- up ----------------------------------------------------------------------------------------

    def up(self) -> list[str]:
        """Start what is not running, wait until the stack serves jobs; returns what it started."""
        with self.processes.locked():
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
        settings = self.settings
        entries = catalog_entries(settings.model, self.devenv.tiny_model)
        previous = self.processes.config()
        alive = self.processes.running()
        redis_url, own_redis = self._choose_redis(alive, (previous or {}).get("redis_url"))
        config = {"port": settings.port, "redis_url": redis_url, "models": entries}
        if alive and previous not in (None, config):
            # Mixing old and new settings would leave, e.g., a worker for another model.
            raise StackError(self._settings_changed(previous or {}, config))
        for name in set(SERVICES) - alive.keys():
            self.processes.forget(name)  # it died: its pid may be another program's by now
        self.processes.save_config(config)

        if "gateway" not in alive and _port_in_use(settings.port):
            raise StackError(
                f"port {settings.port} is in use by another program (not this stack's gateway); "
                "stop it, or pick another port with MASACTRL_STACK_PORT=<port>"
            )
        if own_redis and "redis" not in alive:
            self._start_redis(started)
        elif "redis" in alive:
            self.say(f"{'redis':<9} running  pid {alive['redis'].pid}")
        self.devenv.prepare(entries, self.say)

        # Model name -> the worker process that serves it: the default model's is "worker".
        workers = {
            entry["name"]: "worker" if k == 0 else f"worker-{entry['name']}"
            for k, entry in enumerate(entries)
        }
        env = self.devenv.environment(
            api_url=self.api_url, redis_url=redis_url, models=list(workers)
        )
        masactrl = [sys.executable, "-m", "masactrl_cli.main"]
        commands = {
            "gateway": [*masactrl, "serve", "--host", "127.0.0.1", "--port", str(settings.port)],
            **{name: [*masactrl, "worker", "--model", m] for m, name in workers.items()},
            "webhooks": [*masactrl, "worker", "--webhooks"],
        }
        details = {"gateway": self.api_url}
        details.update({workers[e["name"]]: f"model {e['name']} ({e['source']})" for e in entries})
        workers_before = {model: self._worker_ids(redis_url, model) for model in workers}
        # Every process starts before any is waited for: the workers load their models at once.
        for name in (n for n in _APPS if n in commands):
            if name in alive:
                self.say(f"{name:<9} running  pid {alive[name].pid}")
                continue
            pid = self.processes.start(name, commands[name], env)
            started.append(name)
            self.say(f"{name:<9} started  pid {pid}  {details.get(name, '')}".rstrip())
        fresh = {model for model, name in workers.items() if name in started}
        self._wait_ready([*started, *alive], redis_url, workers_before, fresh, workers)
        self.say(f"ready in {time.monotonic() - begin:.1f} s")

    def _settings_changed(self, running: dict[str, Any], asked: dict[str, Any]) -> str:
        changes = [
            f"{what} {running.get(key)!s} (now asked for {asked[key]!s})"
            for what, key in (("port", "port"), ("Redis", "redis_url"))
            if running.get(key) != asked[key]
        ]
        if running.get("models") != asked["models"]:
            old = ", ".join(str(m.get("source")) for m in running.get("models") or [])
            new = ", ".join(str(m["source"]) for m in asked["models"])
            changes.append(f"models {old or '?'} (now asked for {new})")
        return (
            f"the stack in {display_path(self.settings.dir)} runs with {', '.join(changes)}; "
            "run `make down` first to change it"
        )

    def _choose_redis(self, alive: Collection[str], running_url: str | None) -> tuple[str, bool]:
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
        if set(alive) - {"redis"} and configured and running_url == configured:
            raise StackError(
                f"the running stack uses Redis at {running_url}, which no longer answers; "
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
        data = self.settings.dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        command = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data.resolve()),
            # AOF keeps queued jobs across a restart, as in docker-compose; no RDB snapshots.
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        url = f"redis://127.0.0.1:{port}/0"
        pid = self.processes.start("redis", command, dict(os.environ))
        started.append("redis")
        self.say(f"{'redis':<9} started  pid {pid}  {url}")
        deadline = time.monotonic() + 20
        while not _redis_answers(url):
            self._check_alive(["redis"])
            if time.monotonic() > deadline:
                raise StackError(
                    f"redis-server does not answer on port {port}; see "
                    f"{display_path(self.processes.log_file('redis'))}"
                )
            time.sleep(_POLL_SECONDS)

    def _check_alive(self, names: Iterable[str]) -> None:
        for name in names:
            if self.processes.find(name) is None:
                log = self.processes.log_file(name)
                last = _failure_line(log)
                raise StackError(
                    f"{name} exited during start-up"
                    + (f" ({last})" if last else "")
                    + f"; see {display_path(log)}"
                )

    def _worker_ids(self, redis_url: str, model: str) -> set[str]:
        """Worker ids with a fresh heartbeat for ``model`` (empty if Redis is not up yet)."""
        import redis

        from masactrl_jobs.store import JobStore

        store = JobStore.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return store.live_workers(model)
        except (redis.RedisError, OSError):
            return set()
        finally:
            store.close()

    def _wait_ready(
        self,
        watched: list[str],
        redis_url: str,
        workers_before: dict[str, set[str]],
        fresh: set[str],
        workers: dict[str, str],
    ) -> None:
        """Until /readyz is 200 and every model of ``workers_before`` is live, through a new
        worker for the models in ``fresh`` (their worker process started now). ``workers``: the
        process serving each model, for the log to name."""
        import httpx

        for model in fresh:
            log = display_path(self.processes.log_file(workers[model]))
            self.say(f"waiting for the worker to load {model} (log: {log})")
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
                        answer = http.get("/v1/models")
                        if answer.status_code == 401:
                            raise StackError(
                                f"the running gateway refuses the key in "
                                f"{display_path(self.devenv.api_key_file)} (was it replaced?); "
                                "run `make down`, then `make up`"
                            )
                        live = {
                            m.get("name") for m in answer.json().get("data", []) if m.get("live")
                        }
                        # A worker killed moments ago still looks live until its heartbeat
                        # expires; the one this run started must have registered itself.
                        waiting = [
                            model
                            for model, before in workers_before.items()
                            if model not in live
                            or (model in fresh and not self._worker_ids(redis_url, model) - before)
                        ]
                        if not waiting:
                            return
                        waiting_for = f"a live worker for {', '.join(waiting)}"
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise StackError(
                        f"timed out after {self.settings.start_timeout_seconds:g} s waiting for "
                        f"{waiting_for}; see the logs in {display_path(self.processes.log_dir)}"
                    )
                time.sleep(_POLL_SECONDS)

    # -- down --------------------------------------------------------------------------------------

    def down(self, names: Iterable[str] | None = None) -> list[str]:
        """Stop the recorded processes (all, or ``names``); returns the names it stopped."""
        with self.processes.locked():
            return self._stop(list(names) if names is not None else list(SERVICES))

    def _stop(self, names: list[str]) -> list[str]:
        grace = self.settings.stop_timeout_seconds
        # Applications first, Redis last, so nothing logs a lost connection on the way down.
        stopped = self.processes.stop([n for n in _APPS if n in names], grace)
        return stopped + self.processes.stop([n for n in ("redis",) if n in names], grace)

    # -- what to tell the user ---------------------------------------------------------------------

    def summary(self) -> list[str]:
        """How to use the running stack, a few lines."""
        devenv = self.devenv
        key_file = display_path(devenv.api_key_file)
        secret_file = display_path(devenv.webhook_secret_file)
        masactrl = display_path(Path(sys.executable).with_name("masactrl"))
        lines = [
            f"gateway:  {self.api_url}   API docs: {self.api_url}/docs",
            f"playground: {self.api_url}/playground   (paste the API key below)",
            f"API key:  {self.api_key}   (saved in {key_file})",
            f"webhooks: signed with the dev secret in {secret_file}; http://127.0.0.1 receivers "
            "allowed",
            f"logs:     {display_path(self.processes.log_dir)}/<name>.log   "
            f"pids: {display_path(self.processes.run_dir)}",
        ]
        if self.settings.port != 8000:
            lines.append(f"client:   export MASACTRL_API_URL={self.api_url}")
        lines += [
            # Words the default toy model knows (a prompt outside them only earns a warning).
            f"try:      {masactrl} client synthesize --source-prompt "
            '"a creature with arms up sitting facing left on snow on the left" '
            '--target-prompt "a creature with arms up standing facing left on snow on the left" '
            "--steps 20 --out out/try",
        ]
        if self.processes.find("worker-tiny") is not None:
            # The toy model has no condition model: layouts and sequences go to the tiny one.
            lines.append(
                f"sequence: {masactrl} client sequence --model tiny --source-prompt "
                '"a creature" --target-prompt "a creature dancing" --condition-model canny '
                "--condition-preprocess canny --video examples/dance.mp4 --steps 10 --out out/clip"
                "   (tiny: random weights, layouts and sequences plumbing)"
            )
        lines += [
            "stop:     make down",
        ]
        return lines


# --- the subcommands ------------------------------------------------------------------------------


def default_help(field: str) -> str:
    """ "(default: MASACTRL_STACK_<FIELD> or <value>)": the variable behind an option's default."""
    info = StackSettings.model_fields[field]
    default = info.default if not isinstance(info.default, Path) else f"./{info.default}"
    return f"(default: MASACTRL_STACK_{field.upper()} or {default})"


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    """``up`` and ``down`` share the location options; ``up`` adds the start-up timeout."""
    parser.add_argument("--dir", type=Path, help=f"stack folder {default_help('dir')}")
    if command == "up":
        parser.add_argument("--port", type=int, help=f"gateway port {default_help('port')}")
        parser.add_argument(
            "--redis-port",
            type=int,
            help=f"port of the stack's own redis-server {default_help('redis_port')}",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            help=f"seconds to wait for a live worker {default_help('start_timeout_seconds')}",
        )
    else:
        parser.add_argument(
            "--timeout",
            type=float,
            help=f"grace in seconds after SIGTERM before SIGKILL "
            f"{default_help('stop_timeout_seconds')}",
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
        elif not stack.down():
            print(f"nothing to stop in {display_path(stack.settings.dir)}")
    except StackError as exc:
        print(f"masactrl {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
