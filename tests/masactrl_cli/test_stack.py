"""``masactrl up`` / ``down`` / ``demo`` as real processes in temporary folders on private ports.

The tests on the shared ``local_stack`` run in file order: looking at what ``up`` wrote, a second
``up`` that starts nothing, the demo reusing the stack, a killed worker brought back alone, and
``down`` last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from masactrl_cli.devenv import catalog_entries, catalog_entry
from masactrl_cli.errors import StackError
from masactrl_cli.stack import SERVICES, LocalStack, Processes, StackSettings
from tests.masactrl_cli.conftest import StackRun, alive, kill_groups, masactrl, stack_environment

# What the shared stack runs: MASACTRL_MODEL=tiny serves that model alone, so no second worker.
TINY_STACK = tuple(name for name in SERVICES if name != "worker-tiny")


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.05)


def _lines(text: str) -> dict[str, str]:
    """``name  state  pid ...`` lines of up/down, by name."""
    found = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name in SERVICES:
            found[name] = rest.split()[0]
    return found


# --- the shared stack, in order ----------------------------------------------------------------


@pytest.mark.slow
def test_up_writes_pids_logs_keys_and_serves_the_tiny_model(local_stack: StackRun) -> None:
    var = local_stack.root / "var"
    pids = local_stack.pids()
    assert sorted(pids) == sorted(TINY_STACK)
    assert all(alive(pid) for pid in pids.values())
    for name in TINY_STACK:
        assert (var / "log" / f"{name}.log").stat().st_size > 0
    for secret in ("dev-api-key", "dev-webhook-secret"):
        assert stat.S_IMODE((var / secret).stat().st_mode) == 0o600
    assert (var / "dev-webhook-secret").read_text().startswith("whsec_")
    assert (var / "models/tiny-sd/model_index.json").is_file()  # written by `up` itself
    assert (var / "redis/appendonlydir").is_dir()  # AOF on

    headers = {"Authorization": f"Bearer {local_stack.api_key}"}
    with httpx.Client(base_url=local_stack.api_url, headers=headers) as http:
        assert http.get("/readyz").status_code == 200
        models = http.get("/v1/models").json()
    assert models["default"] == "tiny"
    assert [(m["name"], m["live"]) for m in models["data"]] == [("tiny", True)]


@pytest.mark.slow
def test_catalog_entry_of_the_tiny_checkpoint_matches_its_configs(local_stack: StackRun) -> None:
    folder = local_stack.root / "var/models/tiny-sd"
    derived = catalog_entry(str(folder), folder)
    assert derived == {**catalog_entry("tiny", folder), "name": "tiny-sd"}


@pytest.mark.slow
def test_a_second_up_starts_nothing(local_stack: StackRun) -> None:
    before = local_stack.pids()
    result = local_stack.run("up", timeout=60)
    assert result.returncode == 0, result.stderr
    assert _lines(result.stdout) == dict.fromkeys(TINY_STACK, "running")
    assert f"playground: {local_stack.api_url}/playground" in result.stdout
    assert local_stack.pids() == before


@pytest.mark.slow
def test_up_refuses_other_settings_while_the_stack_runs(local_stack: StackRun) -> None:
    env = {**local_stack.env, "MASACTRL_STACK_PORT": "1"}
    result = masactrl(local_stack.root, env, "up", timeout=60)
    assert result.returncode == 1
    assert f"runs with port {local_stack.env['MASACTRL_STACK_PORT']} (now asked for 1)" in (
        result.stderr
    )
    assert "run `make down` first" in result.stderr


@pytest.mark.slow
def test_demo_reuses_the_running_stack_and_leaves_it_running(local_stack: StackRun) -> None:
    before = local_stack.pids()
    result = local_stack.run("demo", "--steps", "3", "--quiet", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "using the running stack" in result.stdout
    assert f"API docs: {local_stack.api_url}/docs" in result.stdout
    assert "the stack keeps running" in result.stdout
    out = local_stack.root / "out"
    assert "submitted layout-guided edit" in result.stdout
    paths = ("edit/source_0.png", "edit/target_0.png", "synthesis/target_1.png")
    for path in (*paths, "layout/source_0.png", "layout/target_0.png", "sequence/frame_0.png"):
        assert (out / path).is_file()
        assert str(Path("out") / path) in result.stdout
    assert (out / "sequence/sequence.mp4").stat().st_size > 0
    assert local_stack.pids() == before


@pytest.mark.slow
def test_a_killed_worker_is_restarted_alone_by_up(local_stack: StackRun) -> None:
    before = local_stack.pids()
    os.killpg(before["worker"], signal.SIGKILL)  # the worker and its pool child, as an OOM kill
    _wait_gone(before["worker"])

    result = local_stack.run("up", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    states = _lines(result.stdout)
    assert states == {"redis": "running", "gateway": "running", "worker": "started",
                      "webhooks": "running"}  # fmt: skip
    after = local_stack.pids()
    assert after["worker"] != before["worker"]
    assert {k: v for k, v in after.items() if k != "worker"} == {
        k: v for k, v in before.items() if k != "worker"
    }
    # `up` returned only once the new worker registered: a job runs at once.
    result = local_stack.run(
        "client", "synthesize", "--source-prompt", "a cat", "--target-prompt", "a dog",
        "--steps", "2", "--wait", "--quiet", "--api-url", local_stack.api_url, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_down_stops_exactly_the_recorded_processes(local_stack: StackRun) -> None:
    pids = local_stack.pids()
    # A bystander: not started by `up`, so `down` must leave it alone.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        result = local_stack.run("down", timeout=60)
        assert result.returncode == 0, result.stderr
        assert _lines(result.stdout) == dict.fromkeys(TINY_STACK, "stopped")
        for pid in pids.values():
            _wait_gone(pid)
        assert local_stack.pids() == {}
        assert not (local_stack.root / "var/run/stack.json").exists()
        assert bystander.poll() is None

        # A pid file that names a process `up` did not start is removed, never signalled.
        (local_stack.root / "var/run/gateway.pid").write_text(f"{bystander.pid}\n")
        result = local_stack.run("down", timeout=60)
        assert result.returncode == 0
        assert "gateway   not running (removed its stale pid file)" in result.stdout
        assert bystander.poll() is None
        assert not (local_stack.root / "var/run/gateway.pid").exists()

        result = local_stack.run("down", timeout=60)
        assert result.stdout.strip() == "nothing to stop in var"
    finally:
        bystander.kill()
        bystander.wait()


# --- failures that start nothing ---------------------------------------------------------------


def _up_expecting_failure(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return masactrl(root, env, "up", timeout=60)
    finally:
        # Should it start something after all, the test fails but leaves no process behind.
        pids = {int(p.read_text()) for p in (root / "var/run").glob("*.pid")}
        kill_groups(pids)


def test_up_refuses_a_port_in_use_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = stack_environment(tmp_path, MASACTRL_STACK_PORT=str(port))
        result = _up_expecting_failure(tmp_path, env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"masactrl up: error: port {port} is in use by another program (not this stack's "
        "gateway); stop it, or pick another port with MASACTRL_STACK_PORT=<port>"
    )
    assert list((tmp_path / "var/run").glob("*.pid")) == []


def test_up_without_redis_server_says_how_to_install_it(tmp_path: Path) -> None:
    env = stack_environment(tmp_path, PATH=str(tmp_path / "empty-bin"))
    result = _up_expecting_failure(tmp_path, env)
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line
    assert "redis-server is not installed" in line
    assert "apt-get install redis-server" in line and "brew install redis" in line
    assert list((tmp_path / "var/run").glob("*.pid")) == []


def test_a_configured_redis_that_answers_is_used_instead_of_starting_one(
    tmp_path: Path, redis_url: str
) -> None:
    # redis_url is the test session's private redis-server, never the shared 6379.
    said: list[str] = []
    stack = LocalStack(StackSettings(dir=tmp_path / "var", redis_url=redis_url), say=said.append)
    assert stack._choose_redis((), None) == (redis_url, False)

    dead = "redis://127.0.0.1:1/0"
    stack = LocalStack(
        StackSettings(dir=tmp_path / "var", redis_url=dead, redis_port=6399), say=said.append
    )
    assert stack._choose_redis((), None) == ("redis://127.0.0.1:6399/0", True)
    assert said == [
        f"MASACTRL_REDIS_URL ({dead}) does not answer; starting a redis-server on "
        "127.0.0.1:6399 instead"
    ]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("sd15", {"name": "sd15", "family": "sd"}),
        ("stabilityai/stable-diffusion-xl-base-1.0", {"name": "sdxl", "family": "sdxl"}),
        ("someone/dreamy-xl", {"name": "dreamy-xl", "family": "sdxl"}),
        (
            "stabilityai/stable-diffusion-2-1",
            {"name": "stable-diffusion-2-1", "family": "sd", "native_width": 768},
        ),
        ("stabilityai/stable-diffusion-2-1-base", {"family": "sd", "native_width": None}),
        ("black-forest-labs/FLUX.1-dev", {"name": "flux.1-dev", "family": "flux"}),
        (
            "stabilityai/stable-diffusion-3.5-large",
            {"name": "stable-diffusion-3.5-large", "family": "sd3"},
        ),
    ],
)
def test_catalog_entry_of_hub_ids(model: str, expected: dict[str, object], tmp_path: Path) -> None:
    entry = catalog_entry(model, tmp_path)
    for key, value in expected.items():
        assert entry.get(key) == value, entry


@pytest.mark.parametrize(
    ("pipeline", "family"), [("FluxPipeline", "flux"), ("StableDiffusion3Pipeline", "sd3")]
)
def test_catalog_entry_of_an_mmdit_folder_leaves_its_shape_to_the_worker(
    pipeline: str, family: str, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    entry = catalog_entry(str(folder), tmp_path)
    assert entry == {"name": "model", "source": str(folder.resolve()), "family": family}


def test_catalog_entry_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="no such folder"):
        catalog_entry(str(tmp_path / "nowhere"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StackError, match="without model_index.json"):
        catalog_entry(str(tmp_path / "empty"), tmp_path)


def test_the_default_model_is_the_committed_toy_checkpoint(tmp_path: Path) -> None:
    from masactrl_jobs.catalog import catalog_from_data

    entry = catalog_entry(None, tmp_path / "tiny")
    assert (entry["name"], entry["family"], entry["native_width"]) == ("toy-shapes", "sd", 32)
    toy = catalog_from_data({"default": "toy-shapes", "models": [entry]}).default_entry
    # Declared by the checkpoint (models/toy-shapes/masactrl.json): the paper's defaults.
    assert toy.default_control == {"start_step": 4, "start_layer": 10}
    assert toy.size_multiple == 16


def test_the_default_stack_serves_the_toy_model_and_the_tiny_one_beside_it(
    tmp_path: Path,
) -> None:
    tiny = tmp_path / "tiny"
    default = catalog_entries(None, tiny)
    assert [entry["name"] for entry in default] == ["toy-shapes", "tiny"]
    assert default[1] == catalog_entry("tiny", tiny)
    # A model named explicitly is served alone, the tiny one too.
    assert catalog_entries("tiny", tiny) == [catalog_entry("tiny", tiny)]
    assert [e["name"] for e in catalog_entries("sd15", tiny)] == ["sd15"]


def test_the_written_catalog_lists_both_models_with_the_tiny_condition_model(
    tmp_path: Path,
) -> None:
    from masactrl_cli.devenv import DevEnv
    from masactrl_jobs.catalog import catalog_from_data

    devenv = DevEnv(tmp_path / "var")
    for folder, marker in (
        (devenv.tiny_model, "model_index.json"),
        (devenv.tiny_controlnet, "config.json"),
        (devenv.tiny_preview_vae, "config.json"),
        (devenv.tiny_lora, "pytorch_lora_weights.safetensors"),
    ):  # as if written already: no torch subprocess here
        folder.mkdir(parents=True)
        (folder / marker).write_text("{}")
    devenv.prepare(catalog_entries(None, devenv.tiny_model), print)
    data = json.loads(devenv.catalog.read_text())
    assert data["default"] == "toy-shapes"
    toy, tiny = data["models"]
    assert "conditions" not in toy
    assert tiny["conditions"] == {
        "canny": {"source": str(devenv.tiny_controlnet.resolve()), "kind": "controlnet"}
    }
    assert tiny["loras"] == {"tiny-style": {"source": str(devenv.tiny_lora.resolve())}}
    catalog = catalog_from_data(data)
    assert catalog.default_entry.name == "toy-shapes"
    assert sorted(catalog.get("tiny").loras) == ["tiny-style"]


def test_the_written_catalog_is_valid(tmp_path: Path) -> None:
    from masactrl_jobs.catalog import catalog_from_data

    entry = catalog_entry("tiny", tmp_path / "tiny")
    catalog = catalog_from_data({"default": "tiny", "models": [entry]})
    assert catalog.default_entry.max_pixels == 64 * 64 * 4
    assert json.loads(json.dumps(entry)) == entry


# --- the demo on its own stack -----------------------------------------------------------------


def _own_stack_root(local_stack: StackRun, root: Path) -> dict[str, str]:
    """A fresh folder sharing the session's tiny checkpoint (writing one costs seconds)."""
    models = root / "var/models"
    models.mkdir(parents=True)
    (models / "tiny-sd").symlink_to(local_stack.root / "var/models/tiny-sd")
    (models / "tiny-controlnet").symlink_to(local_stack.root / "var/models/tiny-controlnet")
    (models / "tiny-preview-vae").symlink_to(local_stack.root / "var/models/tiny-preview-vae")
    (models / "tiny-lora").symlink_to(local_stack.root / "var/models/tiny-lora")
    return stack_environment(root)


@pytest.mark.slow
def test_demo_starts_its_own_stack_and_stops_all_of_it(
    local_stack: StackRun, tmp_path: Path
) -> None:
    env = _own_stack_root(local_stack, tmp_path)
    del env["MASACTRL_MODEL"]  # the stack's default: the committed toy-world checkpoint
    try:
        result = masactrl(tmp_path, env, "demo", "--steps", "2", "--quiet", timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        # The default stack: the toy model's worker and, beside it, the tiny model's.
        assert _lines(result.stdout.split("stopping the stack")[0]) == dict.fromkeys(
            SERVICES, "started"
        )
        assert "stopping the stack this demo started (redis, gateway, worker, worker-tiny, " in (
            result.stdout
        )
        catalog = json.loads((tmp_path / "var/catalog.json").read_text())
        assert catalog["default"] == "toy-shapes"
        assert [m["name"] for m in catalog["models"]] == ["toy-shapes", "tiny"]
        for name in ("edit", "edit-off", "synthesis", "synthesis-off", "layout"):
            assert (tmp_path / "out" / name / "target_0.png").is_file()
        # Layouts and the sequence ran on the tiny model, the one with a condition model.
        assert "submitted layout-guided edit" in result.stdout and " on tiny (" in result.stdout
        assert (tmp_path / "out/sequence/sequence.mp4").stat().st_size > 0
        sheet = tmp_path / "out/comparison.png"
        assert "without MasaCtrl | with MasaCtrl): out/comparison.png" in result.stdout
        assert Image.open(sheet).size[0] > 3 * 32 * 6
        assert list((tmp_path / "var/run").glob("*.pid")) == []
    finally:
        kill_groups({int(p.read_text()) for p in (tmp_path / "var/run").glob("*.pid")})


@pytest.mark.slow
def test_an_interrupted_demo_still_stops_what_it_started(
    local_stack: StackRun, tmp_path: Path
) -> None:
    env = {**_own_stack_root(local_stack, tmp_path), "MASACTRL_STEP_DELAY_SECONDS": "0.5"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "masactrl_cli.main", "demo", "--quiet"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: set[int] = set()
    try:
        assert demo.stdout is not None
        output = ""
        for line in demo.stdout:  # until the jobs are in: the whole stack is up
            output += line
            if line.startswith("submitted"):
                break
        seen = {int(p.read_text()) for p in (tmp_path / "var/run").glob("*.pid")}
        assert len(seen) == len(TINY_STACK), output
        demo.send_signal(signal.SIGTERM)  # as a CI timeout would; Ctrl-C takes the same path
        rest, _ = demo.communicate(timeout=60)
        assert demo.returncode == 130, output + rest
        assert "stopping the stack this demo started" in rest
        for pid in seen:
            _wait_gone(pid)
        assert list((tmp_path / "var/run").glob("*.pid")) == []
    finally:
        demo.kill()
        demo.wait()
        kill_groups(seen | {int(p.read_text()) for p in (tmp_path / "var/run").glob("*.pid")})


@pytest.mark.slow
def test_a_failed_start_names_the_cause_and_stops_what_it_started(tmp_path: Path) -> None:
    # A gateway setting out of range: the gateway exits at once with one line in its log.
    env = stack_environment(tmp_path, MASACTRL_MAX_WAIT_SECONDS="999")
    result = _up_expecting_failure(tmp_path, env)
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("masactrl up: error: gateway exited during start-up (")
    assert "MASACTRL_MAX_WAIT_SECONDS" in error and error.endswith("; see var/log/gateway.log")
    assert "stopping what this run started: redis, gateway, worker, webhooks" in result.stdout
    assert list((tmp_path / "var/run").glob("*.pid")) == []


def test_failure_line_prefers_the_exception_of_the_last_run(tmp_path: Path) -> None:
    from masactrl_cli.stack import _failure_line

    log = tmp_path / "worker.log"
    log.write_text(
        "=== 2026-01-01 masactrl up: old run\n"
        "OSError: from an earlier run\n"
        "=== 2026-01-02 masactrl up: this run\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "masactrl_core.errors.ModelLoadError: cannot load model m: no model_index.json\n"
        "\n"
        "worker: Cold shutdown (MainProcess)\n"
    )
    assert _failure_line(log) == (
        "masactrl_core.errors.ModelLoadError: cannot load model m: no model_index.json"
    )
    log.write_text("=== start\nmasactrl serve: error: invalid configuration: X\n")
    assert _failure_line(log) == "masactrl serve: error: invalid configuration: X"
    assert _failure_line(tmp_path / "missing.log") == ""


# --- process identity and stopping, without a stack --------------------------------------------


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )


def test_a_recycled_pid_is_never_taken_for_ours(tmp_path: Path) -> None:
    # A record whose creation time is not that of the process now holding the pid: what `down`
    # finds after the system gave the pid of a stack process to another program.
    bystander = _sleeper()
    try:
        said: list[str] = []
        processes = Processes(tmp_path / "var", said.append)
        processes.run_dir.mkdir(parents=True)
        created = psutil.Process(bystander.pid).create_time()
        record = {"pid": bystander.pid, "create_time": created - 60}
        (processes.run_dir / "stack.json").write_text(
            json.dumps({"processes": {"gateway": record}})
        )
        processes.pid_file("gateway").write_text(f"{bystander.pid}\n")

        assert processes.find("gateway") is None
        assert processes.stop(["gateway"], grace=1) == []
        assert said == ["gateway   not running (removed its stale pid file)"]
        assert bystander.poll() is None
        assert not processes.pid_file("gateway").exists()
        assert not (processes.run_dir / "stack.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_takes_the_whole_tree_and_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    # A leader with a child that ignores SIGTERM, like a pool process stuck in a job.
    ready = tmp_path / "child-ready"
    child = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
    )
    leader = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}, "
        "sys.argv[1]]); time.sleep(60)"
    )
    said: list[str] = []
    processes = Processes(tmp_path / "var", said.append)
    pid = processes.start("worker", [sys.executable, "-c", leader, str(ready)], dict(os.environ))
    tree = {pid}
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        assert processes.running().keys() == {"worker"}
        tree |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
        assert len(tree) == 2

        assert processes.stop(["worker"], grace=1) == ["worker"]
        assert said == [
            "worker    did not stop within 1 s; killing it",
            f"worker    stopped  pid {pid}",
        ]
        for member in tree:
            _wait_gone(member)
        assert processes.running() == {}
        assert not processes.pid_file("worker").exists()
    finally:
        kill_groups(tree)
