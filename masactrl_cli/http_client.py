"""A small synchronous client for the MasaCtrl HTTP API, for scripts, the CLI and the demo.

Torch-free (httpx only), and it speaks the API as documented in docs/api.md: jobs are the JSON
objects the gateway returns, unchanged, so what ``curl`` shows is what a script gets::

    from masactrl_cli.http_client import MasaCtrlClient

    with MasaCtrlClient("http://127.0.0.1:8000", api_key) as client:
        job = client.edit(Path("cat.png"), ["a cat wearing a hat"], steps=20)
        job = client.wait(job["id"])                       # follows the SSE stream
        paths = client.download(job, Path("out"))          # result PNGs plus job.json

Failures raise :class:`ApiError` (the gateway answered with an error body) or
:class:`GatewayUnreachable` (no answer at all). Submissions carry an ``Idempotency-Key`` so the
client can retry ``429`` and ``503`` answers (after their ``Retry-After``) without creating a
second job.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

__all__ = [
    "DEFAULT_API_URL",
    "DEV_API_KEY_FILE",
    "TERMINAL_STATUSES",
    "ApiError",
    "ClientError",
    "Event",
    "GatewayUnreachable",
    "MasaCtrlClient",
    "image_url",
    "parse_sse",
    "resolve_api_key",
    "resolve_api_url",
]

DEFAULT_API_URL = "http://127.0.0.1:8000"
# Written by `masactrl up` (relative to the directory it runs in, like everything under var/).
DEV_API_KEY_FILE = Path("var/dev-api-key")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# Answers worth retrying: the gateway says "later" with a Retry-After.
_RETRY_STATUSES = frozenset({429, 503})
_MAX_RETRY_AFTER = 30.0
# The gateway sends a keep-alive comment every 15 s by default; a silent minute is a dead stream.
_SSE_READ_TIMEOUT = 60.0
_URL_SCHEMES = ("data:", "https://", "http://", "s3://")


class ClientError(Exception):
    """Anything the client cannot turn into a job object."""


class ApiError(ClientError):
    """The gateway answered with an error status and its ``{"error": ...}`` body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """Parse the gateway's error body; anything else (a proxy's page) becomes its text."""
        retry_after = _seconds(response.headers.get("Retry-After"))
        try:
            error = response.json()["error"]
            return cls(
                response.status_code,
                str(error.get("code") or "error"),
                str(error.get("message") or response.reason_phrase),
                list(error.get("details") or []),
                retry_after,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            text = " ".join(response.text.split())[:200] or response.reason_phrase
            return cls(response.status_code, "http_error", text, [], retry_after)


class GatewayUnreachable(ClientError):
    """No HTTP answer: nothing listens, the connection broke, or it timed out."""

    def __init__(self, base_url: str, exc: Exception) -> None:
        self.base_url = base_url
        self.reason = type(exc).__name__
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            message = (
                f"cannot reach the gateway at {base_url}; is it running? try `make up` "
                f"({self.reason})"
            )
        else:
            message = f"the gateway at {base_url} stopped answering ({self.reason}: {exc})"
        super().__init__(message)


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event; ``data`` is parsed JSON (or the raw text if it is not JSON)."""

    event: str
    data: Any
    id: str | None = None


def image_url(image: Path | bytes | str) -> str:
    """An image for a JSON field: URLs as they are, a file or bytes as a ``data:`` URL."""
    if isinstance(image, str) and image.startswith(_URL_SCHEMES):
        return image
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    # The gateway reads the type from the bytes, never from this label.
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def resolve_api_url(explicit: str | None = None) -> str:
    """``explicit``, else ``MASACTRL_API_URL``, else http://127.0.0.1:8000 (no trailing slash)."""
    url = explicit or os.environ.get("MASACTRL_API_URL") or DEFAULT_API_URL
    return url.strip().rstrip("/")


def resolve_api_key(explicit: str | None = None, key_file: Path = DEV_API_KEY_FILE) -> str | None:
    """``explicit``, else ``MASACTRL_API_KEY``, else the local stack's key file, else ``None``."""
    key = explicit or os.environ.get("MASACTRL_API_KEY")
    if key:
        return key.strip()
    try:
        return key_file.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Events from the lines of a ``text/event-stream`` (the WHATWG rules this API needs)."""
    event, last_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield Event(event, payload, last_id)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue  # a keep-alive comment
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _queue_options(
    priority: int | None, start_by: datetime | str | None, max_queue_seconds: int | None
) -> dict[str, Any]:
    """The queue options of a request body (only those given)."""
    if isinstance(start_by, datetime):
        start_by = start_by.isoformat()
    options = {"priority": priority, "start_by": start_by, "max_queue_seconds": max_queue_seconds}
    return _drop_none(options)


def _drop_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


class MasaCtrlClient:
    """The MasaCtrl API over one keep-alive connection pool; use it as a context manager."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = resolve_api_url(base_url)
        self.timeout = timeout
        self.retries = retries
        headers = {"User-Agent": "masactrl-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )
        # Result URLs are presigned (S3) or signed (/v1/files): they need no key, and the key must
        # not travel to an object store.
        self._downloads = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()
        self._downloads.close()

    def __enter__(self) -> MasaCtrlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; 429/503 are retried after Retry-After, errors become exceptions."""
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise GatewayUnreachable(self.base_url, exc) from None
            if response.is_success:
                return response
            error = ApiError.from_response(response)
            if response.status_code not in _RETRY_STATUSES or attempt >= self.retries:
                raise error
            attempt += 1
            delay = error.retry_after if error.retry_after is not None else float(attempt)
            time.sleep(min(delay, _MAX_RETRY_AFTER))

    def _submit(self, path: str, idempotency_key: str | None, **kwargs: Any) -> dict[str, Any]:
        # Always keyed: a retried submission returns the job the first attempt created.
        headers = {"Idempotency-Key": idempotency_key or f"masactrl-client-{uuid.uuid4()}"}
        return self._send("POST", path, headers=headers, **kwargs).json()

    # -- the API -------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 (Redis and storage reachable)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the catalog and which models have a live worker."""
        return self._send("GET", "/v1/models").json()

    def edit(
        self,
        image: Path | bytes | str,
        target_prompts: list[str],
        *,
        source_prompt: str | None = None,
        negative_prompt: str | None = None,
        model: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        control: Mapping[str, Any] | None = None,
        loras: Sequence[Mapping[str, Any]] | None = None,
        condition: Mapping[str, Any] | None = None,
        anchor_source: bool | None = None,
        webhook: Mapping[str, Any] | None = None,
        previews: bool | None = None,
        priority: int | None = None,
        start_by: datetime | str | None = None,
        max_queue_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit a real-image edit; returns the queued job.

        ``image`` is a file (a ``Path``) or its bytes, uploaded as multipart, or a ``data:`` /
        ``https://`` / ``s3://`` URL string that the gateway reads itself. ``condition`` is the
        API's object (``{"model": "canny", "images": [url], ...}``; see :func:`image_url`).
        ``loras`` are the model's catalog adapters, ``[{"name": "ink", "weight": 0.8}]``.
        """
        params = _drop_none(
            {
                "model": model,
                "source_prompt": source_prompt,
                "target_prompts": list(target_prompts),
                "negative_prompt": negative_prompt,
                "seed": seed,
                "steps": steps,
                "guidance_scale": guidance_scale,
                "width": width,
                "height": height,
                "control": dict(control) if control else None,
                "loras": [dict(lora) for lora in loras] if loras else None,
                "condition": dict(condition) if condition else None,
                "anchor_source": anchor_source,
                "webhook": dict(webhook) if webhook else None,
                "previews": previews,
                **_queue_options(priority, start_by, max_queue_seconds),
            }
        )
        if isinstance(image, str) and image.startswith(_URL_SCHEMES):
            return self._submit("/v1/edits", idempotency_key, json={"image": image, **params})
        if isinstance(image, bytes):
            name, data = "image", image
        else:
            path = Path(image)
            name, data = path.name, path.read_bytes()
        files = {
            # The gateway reads the type from the bytes, never from the name or this header.
            "image": (name, data, "application/octet-stream"),
            "params": (None, json.dumps(params), "application/json"),
        }
        return self._submit("/v1/edits", idempotency_key, files=files)

    def synthesize(
        self,
        source_prompt: str,
        target_prompts: list[str],
        *,
        negative_prompt: str | None = None,
        model: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        control: Mapping[str, Any] | None = None,
        loras: Sequence[Mapping[str, Any]] | None = None,
        condition: Mapping[str, Any] | None = None,
        webhook: Mapping[str, Any] | None = None,
        previews: bool | None = None,
        priority: int | None = None,
        start_by: datetime | str | None = None,
        max_queue_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit a consistent synthesis; returns the queued job."""
        body = _drop_none(
            {
                "model": model,
                "source_prompt": source_prompt,
                "target_prompts": list(target_prompts),
                "negative_prompt": negative_prompt,
                "seed": seed,
                "steps": steps,
                "guidance_scale": guidance_scale,
                "width": width,
                "height": height,
                "control": dict(control) if control else None,
                "loras": [dict(lora) for lora in loras] if loras else None,
                "condition": dict(condition) if condition else None,
                "webhook": dict(webhook) if webhook else None,
                "previews": previews,
                **_queue_options(priority, start_by, max_queue_seconds),
            }
        )
        return self._submit("/v1/syntheses", idempotency_key, json=body)

    def sequence(
        self,
        target_prompts: list[str],
        condition: Mapping[str, Any],
        *,
        frames: Sequence[Path | bytes | str] = (),
        video: Path | bytes | str | None = None,
        image: Path | bytes | str | None = None,
        source_prompt: str | None = None,
        anchor_source: bool | None = None,
        fps: float | None = None,
        negative_prompt: str | None = None,
        model: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        control: Mapping[str, Any] | None = None,
        loras: Sequence[Mapping[str, Any]] | None = None,
        webhook: Mapping[str, Any] | None = None,
        previews: bool | None = None,
        priority: int | None = None,
        start_by: datetime | str | None = None,
        max_queue_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Submit a sequence; returns the queued job.

        ``condition`` is the API's object without its inputs (``{"model": "canny", "scale":
        0.8}``; a video's ``fps``/``max_frames`` go here too). ``frames`` (in order), ``video``
        and the source ``image`` are files (``Path`` or bytes), sent as multipart parts, or URL
        strings the gateway reads itself; files and URLs are not mixed in one request.
        ``fps`` is the animations' frame rate.
        """
        params = _drop_none(
            {
                "model": model,
                "source_prompt": source_prompt,
                "target_prompts": list(target_prompts),
                "negative_prompt": negative_prompt,
                "seed": seed,
                "steps": steps,
                "guidance_scale": guidance_scale,
                "width": width,
                "height": height,
                "control": dict(control) if control else None,
                "loras": [dict(lora) for lora in loras] if loras else None,
                "anchor_source": anchor_source,
                "fps": fps,
                "webhook": dict(webhook) if webhook else None,
                "previews": previews,
                **_queue_options(priority, start_by, max_queue_seconds),
            }
        )
        inputs = [*frames, *(x for x in (video, image) if x is not None)]
        urls = [isinstance(x, str) and x.startswith(_URL_SCHEMES) for x in inputs]
        if all(urls):
            refs = _drop_none({"frames": list(frames) or None, "video": video})
            body = {**params, "condition": {**condition, **refs}}
            if image is not None:
                body["image"] = image
            return self._submit("/v1/sequences", idempotency_key, json=body)
        if any(urls):
            raise ClientError("send every input of a sequence as a file or every one as a URL")
        files: list[tuple[str, tuple[str | None, bytes | str, str]]] = [
            (
                "params",
                (None, json.dumps({**params, "condition": dict(condition)}), "application/json"),
            )
        ]
        for part, value in [("frame", f) for f in frames] + [("video", video), ("image", image)]:
            if value is not None:
                name, data = _file_part(value, part)
                # The gateway reads the type from the bytes, never from the name or this header.
                files.append((part, (name, data, "application/octet-stream")))
        return self._submit("/v1/sequences", idempotency_key, files=files)

    def get(self, job_id: str, *, wait: int | None = None) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``; ``wait`` holds the answer up to that many seconds for the end."""
        headers = {"Prefer": f"wait={wait}"} if wait else {}
        timeout = self.timeout + (wait or 0)
        return self._send("GET", f"/v1/jobs/{job_id}", headers=headers, timeout=timeout).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: queued jobs end at once, running ones at their next step."""
        return self._send("POST", f"/v1/jobs/{job_id}/cancel").json()

    def retry(
        self,
        job_id: str,
        *,
        priority: int | None = None,
        start_by: datetime | str | None = None,
        max_queue_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Run a failed, canceled or expired job again; returns the new job (``retry_of`` set).

        It keeps the job's priority unless ``priority`` is given, and has no deadline unless
        ``start_by`` or ``max_queue_seconds`` is.
        """
        body = _queue_options(priority, start_by, max_queue_seconds)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        path = f"/v1/jobs/{job_id}/retry"
        return self._send("POST", path, json=body or None, headers=headers).json()

    def events(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """Follow the job's event stream until its terminal event, resuming after dropped links."""
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            timeout = httpx.Timeout(self.timeout, read=_SSE_READ_TIMEOUT)
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
                ) as response:
                    if response.status_code == 204:
                        return  # nothing follows last_event_id: the job has ended
                    if not response.is_success:
                        response.read()
                        raise ApiError.from_response(response)
                    for event in parse_sse(response.iter_lines()):
                        failures = 0
                        if event.id:
                            last_event_id = event.id
                        yield event
                        if event.event in TERMINAL_STATUSES:
                            return
                return  # the stream ended quietly: the job ended (or expired) before `after`
            except httpx.TransportError as exc:
                # A refused connection means the gateway is gone; anything else may be a blip.
                failures += 1
                if isinstance(exc, httpx.ConnectError) or failures > self.retries:
                    raise GatewayUnreachable(self.base_url, exc) from None
                time.sleep(min(0.5 * 2**failures, 5.0))

    def wait(
        self, job_id: str, *, on_event: Callable[[Event], None] | None = None
    ) -> dict[str, Any]:
        """Follow the job until it ends and return the final job object."""
        for event in self.events(job_id):
            if on_event is not None:
                on_event(event)
            terminal = event.event in TERMINAL_STATUSES and isinstance(event.data, dict)
            if terminal and "status" in event.data and "output" in event.data:
                return event.data
        return self.get(job_id)

    def download_preview(self, preview: Mapping[str, Any], out_dir: Path) -> list[Path]:
        """Save a ``preview`` event's images as ``<role>_<index>.webp`` (replacing the last).

        Previews are short-lived: an image already replaced or deleted is skipped, not an error.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for image in preview.get("images", []):
            try:
                response = self._downloads.get(image["url"])
            except httpx.TransportError:
                continue
            if response.is_success:
                path = out_dir / f"{image['role']}_{int(image['index'])}.webp"
                _write_atomically(path, response.content)
                paths.append(path)
        return paths

    def download(self, job: Mapping[str, Any], out_dir: Path) -> list[Path]:
        """Save a succeeded job's images (``source_0.png``, ``target_0.png``, ...) and job.json."""
        output = job.get("output") or {}
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for image in output.get("images", []):
            path = out_dir / PurePosixPath(image["key"]).name
            try:
                response = self._downloads.get(image["url"])
            except httpx.TransportError as exc:
                raise GatewayUnreachable(image["url"], exc) from None
            if not response.is_success:
                raise ApiError.from_response(response)
            _write_atomically(path, response.content)
            paths.append(path)
        record = out_dir / "job.json"
        _write_atomically(record, (json.dumps(job, indent=2) + "\n").encode())
        return [*paths, record]


def _file_part(value: Path | bytes | str, default_name: str) -> tuple[str, bytes]:
    """A multipart file part's name and bytes from a path or raw bytes."""
    if isinstance(value, bytes):
        return default_name, value
    path = Path(value)
    return path.name, path.read_bytes()


def _write_atomically(path: Path, data: bytes) -> None:
    # A half-written PNG left by an interrupted download would look like a result.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
