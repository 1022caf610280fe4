"""A ``--model`` that cannot be had fails in one line at once: no torch, no retries, no chatter.

Each case runs the CLI as its own process with a clean environment and ``HF_ENDPOINT`` pointing
at a loopback socket the test owns, so the test sees every request the process makes to "the
hub" and nothing ever leaves the machine (no DNS either).
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
# Before the fix the unreachable-hub case took about 30 s (five retries with backoff); a process
# that only imports the CLI and answers needs a second or two even on a busy machine.
PATIENCE_SECONDS = 20


def _run_edit(root: Path, model: str, **env: str) -> subprocess.CompletedProcess[str]:
    Image.new("RGB", (64, 64)).save(root / "photo.png")
    code = (
        "import sys\n"
        "from masactrl_cli.main import main\n"
        f"status = main(['edit', '--model', {model!r}, '--image', 'photo.png',"
        " '--target-prompt', 'a dog', '--out', 'out'])\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
        "sys.exit(status)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO_ROOT),
            "HOME": str(root),
            "HF_HOME": str(root / "hf"),  # an empty hub cache and no stored token
            **env,
        },
        capture_output=True,
        text=True,
        timeout=PATIENCE_SECONDS,
    )


def _assert_one_line(done: subprocess.CompletedProcess[str], root: Path, expected: str) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"masactrl edit: error: {expected}"]
    assert done.stdout.strip() == "torch not imported"
    assert not (root / "out").exists()


@pytest.fixture()
def listening_endpoint() -> Iterator[tuple[str, list[str]]]:
    """A loopback "hub" that answers 404 to everything and records each request's path."""
    requests: list[str] = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - the http.server hook name
            requests.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            "models/nope",
            "--model models/nope: no such folder or file (read as a path because ./models "
            "exists; a hub id would be owner/name)",
        ),
        ("./nope", "--model ./nope: no such folder or file"),
        ("~/nope", "--model ~/nope: no such folder or file"),
        ("a/b/c", "--model a/b/c: no such folder or file"),
        ("nope.safetensors", "--model nope.safetensors: no such file"),
        ("models", "--model models is a folder without model_index.json"),
    ],
)
def test_a_missing_local_model_is_one_line_without_asking_the_hub(
    tmp_path: Path, listening_endpoint: tuple[str, list[str]], model: str, expected: str
) -> None:
    (tmp_path / "models").mkdir()
    endpoint, requests = listening_endpoint
    # Online on purpose: a path must be refused without any request, not by the hub's 404.
    done = _run_edit(tmp_path, model, HF_ENDPOINT=endpoint)
    _assert_one_line(done, tmp_path, expected)
    assert requests == []


def test_a_hub_id_offline_and_not_cached_sends_nothing(
    tmp_path: Path, listening_endpoint: tuple[str, list[str]]
) -> None:
    endpoint, requests = listening_endpoint
    done = _run_edit(tmp_path, "someone/model", HF_HUB_OFFLINE="1", HF_ENDPOINT=endpoint)
    _assert_one_line(
        done,
        tmp_path,
        "--model someone/model is not in the local hub cache and HF_HUB_OFFLINE is set: "
        "download it once while online, or give a local folder",
    )
    assert requests == []


def test_an_unreachable_hub_is_one_line_without_retries(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as probe:  # nothing listens there: every connection is refused
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    done = _run_edit(tmp_path, "someone/model", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    _assert_one_line(
        done,
        tmp_path,
        f"--model someone/model: the hub (http://127.0.0.1:{port}) cannot be reached and the "
        "model is not in the local hub cache; give a local folder, or try again when online",
    )


def test_a_hub_id_the_hub_does_not_have_is_asked_for_once(
    tmp_path: Path, listening_endpoint: tuple[str, list[str]]
) -> None:
    endpoint, requests = listening_endpoint
    done = _run_edit(tmp_path, "someone/model", HF_ENDPOINT=endpoint)
    _assert_one_line(
        done,
        tmp_path,
        "--model someone/model: the hub has no such model that this machine may read "
        "(HTTP 404); check the id, or set HF_TOKEN for a private or gated model",
    )
    assert requests == ["/someone/model/resolve/main/model_index.json"]
