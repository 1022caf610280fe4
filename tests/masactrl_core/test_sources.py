"""masactrl_core.sources: the path rule in-process, the hub cases in processes of their own.

huggingface_hub reads HF_HUB_OFFLINE, HF_ENDPOINT and HF_HOME when it is imported, so each hub
case runs ``locate_model`` in a fresh interpreter whose "hub" is a loopback server of the test's.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from masactrl_core.errors import ModelLoadError
from masactrl_core.sources import ModelSource, locate_local, looks_like_path
from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_path_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in ("/x", "./x", "../x", "~/x", "a/b/c", "a\\b", "models/x"):
        assert looks_like_path(path), path
    for hub_id in ("sd15", "owner/name", "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        assert not looks_like_path(hub_id), hub_id
        assert locate_local(hub_id) is None


def test_local_folders_and_files(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "m.safetensors").write_bytes(b"")
    assert locate_local(str(tmp_path)) == ModelSource(str(tmp_path), "folder")
    assert locate_local(str(tmp_path / "m.safetensors")) == ModelSource(
        str(tmp_path / "m.safetensors"), "file"
    )
    with pytest.raises(ModelLoadError, match="model .*gone: no such folder or file$"):
        locate_local(str(tmp_path / "gone"))
    with pytest.raises(ModelLoadError, match="controlnet .* is a folder without config.json"):
        locate_local(str(tmp_path), "controlnet", marker="config.json")
    with pytest.raises(ModelLoadError, match="is a file without a checkpoint suffix"):
        locate_local(str(tmp_path / "model_index.json"))


@pytest.fixture()
def hub() -> Iterator[tuple[str, list[str]]]:
    """A loopback "hub" that has ``someone/model`` only, recording each request's path."""
    requests: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - the http.server hook name
            requests.append(self.path)
            found = self.path == "/someone/model/resolve/main/model_index.json"
            self.send_response(200 if found else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


def _locate(home: Path, repo_id: str, **env: str) -> str:
    code = (
        "from masactrl_core.errors import ModelLoadError\n"
        "from masactrl_core.sources import locate_model\n"
        f"try:\n    print(locate_model({repo_id!r}))\n"
        "except ModelLoadError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO_ROOT),
            "HOME": str(home),
            "HF_HOME": str(home / "hf"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stderr == ""
    return done.stdout.strip()


def _cache(home: Path, repo_id: str) -> None:
    """``repo_id``'s model_index.json in the hub cache layout (refs/main -> snapshot)."""
    repo = home / "hf/hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "model_index.json").write_text("{}")


def test_a_hub_id_the_hub_has_is_found_with_one_request(
    tmp_path: Path, hub: tuple[str, list[str]]
) -> None:
    endpoint, requests = hub
    found = _locate(tmp_path, "someone/model", HF_ENDPOINT=endpoint)
    assert found == "ModelSource(reference='someone/model', kind='hub', cached_only=False)"
    assert requests == ["/someone/model/resolve/main/model_index.json"]
    refused = _locate(tmp_path, "someone/other", HF_ENDPOINT=endpoint)
    assert "the hub has no such model that this machine may read (HTTP 401)" in refused


def test_a_cached_hub_id_loads_from_the_cache_offline_or_when_the_hub_is_down(
    tmp_path: Path, hub: tuple[str, list[str]]
) -> None:
    _cache(tmp_path, "someone/cached")
    cached = "ModelSource(reference='someone/cached', kind='hub', cached_only=True)"
    endpoint, requests = hub
    assert _locate(tmp_path, "someone/cached", HF_HUB_OFFLINE="1", HF_ENDPOINT=endpoint) == cached
    assert requests == []
    down = f"http://127.0.0.1:{free_port()}"
    assert _locate(tmp_path, "someone/cached", HF_ENDPOINT=down) == cached
