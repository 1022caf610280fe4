"""``masactrl client`` and MasaCtrlClient: against the real local stack, and their edges
(SSE parsing and resumption, retries, one-line errors) against loopback or mock transports."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from PIL import Image

from masactrl_cli.http_client import (
    ApiError,
    Event,
    GatewayUnreachable,
    MasaCtrlClient,
    parse_sse,
)
from masactrl_cli.main import main
from tests.conftest import free_port
from tests.masactrl_cli.conftest import REPO_ROOT, StackRun

SAMPLE = REPO_ROOT / "examples/house-and-cat.png"
STEPS = "3"


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    return lines[0]


def _flags(stack: StackRun) -> list[str]:
    return ["--api-url", stack.api_url, "--api-key", stack.api_key]


# --- against the running stack ----------------------------------------------------------------


@pytest.mark.slow
def test_synthesize_waits_and_saves_the_images(
    local_stack: StackRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status = main(
        ["client", "synthesize", "--source-prompt", "a cat sitting"]
        + ["--target-prompt", "a cat running", "--target-prompt", "a cat jumping"]
        + ["--steps", STEPS, "--seed", "7", "--out", str(out), "--quiet", *_flags(local_stack)]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    names = ["source_0.png", "target_0.png", "target_1.png", "job.json"]
    assert captured.out.split() == [str(out / name) for name in names]
    for name in names[:-1]:
        assert Image.open(out / name).size == (64, 64)
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "succeeded" and job["input"]["seed"] == 7


@pytest.mark.slow
def test_edit_then_wait_get_and_cancel_by_id(
    local_stack: StackRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        ["client", "edit", "--image", str(SAMPLE), "--target-prompt", "a red house"]
        + ["--steps", STEPS, *_flags(local_stack)]
    )
    job_id = capsys.readouterr().out.strip()
    assert status == 0 and len(job_id) == 36

    assert main(["client", "wait", job_id, "--out", str(tmp_path), *_flags(local_stack)]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "target_0.png").is_file() and "invert" in captured.err  # a progress bar

    assert main(["client", "get", job_id, *_flags(local_stack)]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["status"] == "succeeded" and job["kind"] == "edit"

    # Cancelling a finished job is the gateway's 409: one line, exit 2.
    assert main(["client", "cancel", job_id, *_flags(local_stack)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("masactrl client: error: The job already ended (succeeded)")
    assert "(HTTP 409 job_finished)" in line


@pytest.mark.slow
def test_previews_are_asked_for_and_their_events_reach_the_client(
    local_stack: StackRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status = main(
        ["client", "synthesize", "--source-prompt", "a cat", "--target-prompt", "a dog"]
        + ["--steps", "12", "--previews", "--out", str(out), "--quiet", *_flags(local_stack)]
    )
    assert status == 0, capsys.readouterr().err
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "succeeded" and job["input"]["previews"] is True
    # The stack's tiny autoencoder previews every 5 steps; the first is never rate-limited.
    with MasaCtrlClient(local_stack.api_url, local_stack.api_key) as client:
        assert client.models()["data"][0]["preview_decoder"] == "tiny_autoencoder"
        again = client.synthesize("a cat", ["a dog"], steps=12, previews=True)
        events: list[Event] = []
        client.wait(again["id"], on_event=events.append)
    previews = [e.data for e in events if e.event == "preview"]
    assert previews and previews[0]["step"] == 5 and previews[0]["steps"] == 12
    assert [(i["role"], i["index"]) for i in previews[0]["images"]] == [
        ("source", 0),
        ("target", 0),
    ]


@pytest.mark.slow
def test_wait_follows_progress_of_both_phases_over_sse(local_stack: StackRun) -> None:
    with MasaCtrlClient(local_stack.api_url, local_stack.api_key) as client:
        job = client.edit(SAMPLE, ["a red house"], steps=4, seed=1)
        assert job["status"] == "queued"
        events: list[Event] = []
        final = client.wait(job["id"], on_event=events.append)
    assert final["status"] == "succeeded" and final["id"] == job["id"]
    phases = {e.data["phase"] for e in events if e.event == "progress"}
    assert phases == {"invert", "denoise"}
    assert events[-1].event == "succeeded" and all(e.id for e in events)


@pytest.mark.slow
def test_key_and_url_come_from_the_environment_and_the_dev_key_file(
    local_stack: StackRun, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MASACTRL_API_URL", local_stack.api_url)
    monkeypatch.chdir(local_stack.root)  # where ./var/dev-api-key is
    assert main(["client", "models"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert models["default"] == "tiny" and models["data"][0]["live"] is True


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["synthesize", "--source-prompt", "a cat", "--target-prompt", "a dog"]
            + ["--steps", "20", "--start-step", "25"],
            "masactrl client: error: control.start_step must be between 0 and steps "
            "(20; equal to steps runs without the control), got 25 (HTTP 422 invalid_request)",
        ),
        (
            ["edit", "--image", str(SAMPLE), "--target-prompt", "x", "--model", "nope"],
            "masactrl client: error: model: unknown model 'nope'; available: tiny "
            "(HTTP 422 invalid_request)",
        ),
        (
            ["get", "01a211c8-741a-73c8-b149-9c6a863d0b47"],
            "masactrl client: error: No job with id '01a211c8-741a-73c8-b149-9c6a863d0b47'. "
            "(HTTP 404 not_found)",
        ),
    ],
    ids=["422-field-path", "422-multipart", "404"],
)
def test_a_4xx_is_the_gateways_sentence_on_one_line_with_exit_2(
    local_stack: StackRun, args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["client", *args, *_flags(local_stack)]) == 2
    assert _one_line(capsys.readouterr().err) == expected


@pytest.mark.slow
def test_a_wrong_key_is_exit_2(local_stack: StackRun, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["client", "models", "--api-url", local_stack.api_url, "--api-key", "wrong"]
    assert main(args) == 2
    assert "(HTTP 401 unauthorized)" in _one_line(capsys.readouterr().err)


# --- without a stack --------------------------------------------------------------------------


def test_an_unreachable_gateway_is_one_line_with_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    args = ["client", "synthesize", "--source-prompt", "a", "--target-prompt", "b"]
    assert main([*args, "--api-url", url, "--api-key", "k"]) == 1
    assert _one_line(capsys.readouterr().err) == (
        f"masactrl client: error: cannot reach the gateway at {url}; is it running? "
        "try `make up` (ConnectError)"
    )


def test_no_api_key_anywhere_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client", "get", "some-id"]) == 2
    assert "no API key: pass --api-key, set MASACTRL_API_KEY" in _one_line(capsys.readouterr().err)


def test_bad_flags_fail_before_any_request(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would be exit 1
    common = ["--target-prompt", "b", "--api-url", url, "--api-key", "k"]
    assert main(["client", "edit", "--image", "missing.png", *common]) == 2
    assert _one_line(capsys.readouterr().err).endswith("image file missing.png does not exist")
    args = ["client", "synthesize", "--source-prompt", "a", "--mask-word", "cat", *common]
    assert main(args) == 2
    assert "--mask-word must be SOURCE_WORD:TARGET_WORD" in _one_line(capsys.readouterr().err)


@pytest.fixture()
def failing_gateway() -> Iterator[str]:
    """A loopback server that answers every request with a 500 error body."""

    class Handler(BaseHTTPRequestHandler):
        def _fail(self) -> None:
            body = json.dumps({"error": {"code": "internal_error", "message": "It broke."}})
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        do_GET = do_POST = _fail  # noqa: N815 (http.server's naming)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_5xx_is_one_line_with_exit_1(
    failing_gateway: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["client", "get", "x", "--api-url", failing_gateway, "--api-key", "k"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line == "masactrl client: error: It broke. (HTTP 500 internal_error)"


def test_a_finished_jobs_warnings_are_one_stderr_line_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from masactrl_cli.client import finish

    warnings = [
        "target_prompts[0]: the model does not know the word 'house'; it was trained on 2 words",
        "negative_prompt: the model does not know the word 'blurry'; it was trained on 2 words",
    ]
    output = {"images": [{"url": "http://127.0.0.1/x.png"}]}
    job = {"id": "j1", "status": "succeeded", "output": output, "warnings": warnings}
    assert finish(None, job, None) == (0, [])  # type: ignore[arg-type]
    captured = capsys.readouterr()
    assert captured.out.split() == ["http://127.0.0.1/x.png"]
    assert captured.err.splitlines() == [f"masactrl client: warning: {w}" for w in warnings]

    # A failed job's warnings come before its error; a job without any prints none.
    error = {"code": "invalid_input", "message": "bad"}
    failed = {"id": "j2", "status": "failed", "error": error, "warnings": warnings[:1]}
    assert finish(None, failed, None)[0] == 1  # type: ignore[arg-type]
    assert capsys.readouterr().err.splitlines() == [
        f"masactrl client: warning: {warnings[0]}",
        "masactrl client: job j2 failed: invalid_input: bad",
    ]
    assert finish(None, {**job, "warnings": []}, None)[0] == 0  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""


def test_parse_sse_handles_comments_multiline_data_and_ids() -> None:
    lines = [
        ": ping",
        "id: 1-0",
        "event: status",
        'data: {"status": "queued"}',
        "",
        "",
        "event: note",
        "data: first",
        "data: second",
        "",
        "data: [1,",
        "data: 2]",
        "",
    ]
    assert list(parse_sse(lines)) == [
        Event("status", {"status": "queued"}, "1-0"),
        Event("note", "first\nsecond", "1-0"),  # the last id carries over, as in browsers
        Event("message", [1, 2], "1-0"),
    ]


class _Breaks(httpx.SyncByteStream):
    """A response body that sends some bytes, then drops the connection."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset")


def test_events_resume_after_a_dropped_stream_with_last_event_id() -> None:
    seen: list[str | None] = []
    job = {"id": "j", "status": "succeeded", "output": {"images": []}}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Last-Event-ID"))
        if len(seen) == 1:
            first = (
                b'id: 5-0\nevent: progress\ndata: {"phase": "denoise", "step": 1, "total": 2}\n\n'
            )
            return httpx.Response(200, stream=_Breaks(first))
        body = f"id: 6-0\nevent: succeeded\ndata: {json.dumps(job)}\n\n".encode()
        return httpx.Response(200, content=body, headers={"Content-Type": "text/event-stream"})

    client = MasaCtrlClient("http://gw", "k", transport=httpx.MockTransport(handler))
    with client:
        final = client.wait("j")
    assert final == job
    assert seen == [None, "5-0"]


def test_rate_limited_submissions_are_retried_with_the_same_idempotency_key() -> None:
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) < 3:
            error = {"error": {"code": "rate_limited", "message": "Slow down."}}
            return httpx.Response(429, json=error, headers={"Retry-After": "0"})
        return httpx.Response(202, json={"id": "j", "status": "queued"})

    with MasaCtrlClient("http://gw", "k", transport=httpx.MockTransport(handler)) as client:
        assert client.synthesize("a", ["b"])["id"] == "j"
    assert len(keys) == 3 and len(set(keys)) == 1


def test_retries_give_up_with_the_last_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        error = {"error": {"code": "queue_full", "message": "The queue is full."}}
        return httpx.Response(429, json=error, headers={"Retry-After": "0"})

    transport = httpx.MockTransport(handler)
    with (
        MasaCtrlClient("http://gw", "k", retries=1, transport=transport) as client,
        pytest.raises(ApiError) as raised,
    ):
        client.synthesize("a", ["b"])
    assert (raised.value.status, raised.value.code) == (429, "queue_full")


def test_downloads_do_not_send_the_api_key(tmp_path: Path) -> None:
    sent: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("Authorization"))
        return httpx.Response(200, content=b"png bytes")

    job = {
        "id": "j",
        "status": "succeeded",
        "output": {"images": [{"key": "results/j/target_0.png", "url": "https://s3/x?sig=1"}]},
    }
    with MasaCtrlClient("http://gw", "secret", transport=httpx.MockTransport(handler)) as client:
        paths = client.download(job, tmp_path)
    assert paths == [tmp_path / "target_0.png", tmp_path / "job.json"]
    assert sent == [None] and (tmp_path / "target_0.png").read_bytes() == b"png bytes"


def test_preview_downloads_keep_the_latest_and_skip_images_already_gone(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers.get("Authorization") is None
        if "gone" in str(request.url):
            return httpx.Response(404)
        return httpx.Response(200, content=str(request.url).encode())

    def preview(step: int, target_url: str) -> dict[str, object]:
        return {
            "step": step,
            "images": [
                {"role": "source", "index": 0, "url": f"https://s3/p/{step}/s?sig=1"},
                {"role": "target", "index": 0, "url": target_url},
            ],
        }

    with MasaCtrlClient("http://gw", "secret", transport=httpx.MockTransport(handler)) as client:
        first = client.download_preview(preview(5, "https://s3/p/5/t?sig=1"), tmp_path)
        second = client.download_preview(preview(10, "https://s3/gone?sig=1"), tmp_path)
    assert first == [tmp_path / "source_0.webp", tmp_path / "target_0.webp"]
    assert second == [tmp_path / "source_0.webp"]
    assert (tmp_path / "source_0.webp").read_bytes() == b"https://s3/p/10/s?sig=1"
    assert (tmp_path / "target_0.webp").read_bytes() == b"https://s3/p/5/t?sig=1"


def test_connect_errors_raise_gateway_unreachable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with (
        MasaCtrlClient("http://gw", "k", transport=httpx.MockTransport(handler)) as client,
        pytest.raises(GatewayUnreachable, match="cannot reach the gateway at http://gw"),
    ):
        client.models()


def test_client_stack_and_demo_never_import_torch() -> None:
    # The client runs where the gateway runs (no torch); `up` must start fast.
    code = (
        "import sys\n"
        "from masactrl_cli.main import main\n"
        "main(['client', 'wait', 'x', '--api-url', 'http://127.0.0.1:1', '--api-key', 'k'])\n"
        "import masactrl_cli.demo, masactrl_cli.stack\n"
        "masactrl_cli.client.EventProgress()\n"
        # masactrl_core.sources (the torch-free rule for model references) may come along.
        "heavy = {'torch', 'diffusers', 'transformers', 'masactrl_core.engine'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_queue_options_and_retry_reach_the_gateway_as_the_api_names_them() -> None:
    seen: list[tuple[str, str, dict[str, str], object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, dict(request.headers), body))
        return httpx.Response(201, json={"id": "new", "status": "queued"})

    with MasaCtrlClient("http://gw", "k", transport=httpx.MockTransport(handler)) as client:
        client.synthesize("a", ["b"], priority=3, start_by="2030-01-01T00:00:00Z")
        client.retry("old", max_queue_seconds=60, idempotency_key="again-1")
        client.retry("older")
    (_, _, _, submitted), (method, path, headers, body), (_, _, _, bare) = seen
    assert submitted["priority"] == 3 and submitted["start_by"] == "2030-01-01T00:00:00Z"
    assert "max_queue_seconds" not in submitted
    assert (method, path, body) == ("POST", "/v1/jobs/old/retry", {"max_queue_seconds": 60})
    assert headers["idempotency-key"] == "again-1"
    assert bare is None  # no options: the gateway keeps the priority, sets no deadline


def test_client_retry_prints_the_new_job_and_bad_queue_flags_are_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    requests: list[tuple[str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            requests.append((self.path, self.rfile.read(length)))
            body = json.dumps({"id": "the-new-job", "status": "queued"}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        flags = ["--api-url", url, "--api-key", "k"]
        assert main(["client", "retry", "old-job", "--priority", "-2", *flags]) == 0
        assert capsys.readouterr().out.strip() == "the-new-job"
        assert requests == [("/v1/jobs/old-job/retry", b'{"priority":-2}')]
        common = ["--source-prompt", "a", "--target-prompt", "b", *flags]
        assert main(["client", "synthesize", "--start-by", "2030-01-01T00:00", *common]) == 2
        assert "needs a time zone offset" in _one_line(capsys.readouterr().err)
        assert len(requests) == 1
    finally:
        server.shutdown()
        server.server_close()
