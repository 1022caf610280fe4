"""Inputs: resolve a reference (data:, https:, s3:, or an earlier input's storage key) or an
upload, validate it, store it.

An earlier job's input is named by the key its job object shows (``inputs/<sha256>.<ext>``), so
a client can run a job again without sending the bytes back; the key is content-addressed, so
naming it proves the caller had the image (or a job that used it).

Reading and validating store nothing; :meth:`RequestIntake.store` runs after every check of the
request, so nothing a refused request sent outlives it.

Memory: each request reads its inputs through its own :class:`RequestIntake`
(:meth:`ImageIntake.request`), which

- charges every input's bytes to the request's byte budget and the process's
  (``service.budget``: 413 past ``max_request_input_bytes``, 503 past
  ``max_inflight_input_bytes``), a fetched body chunk by chunk as it arrives;
- reads a reference named twice in the request once (URLs compared as the server receives them,
  ``netguard.normalized_url``), and validates it once;
- streams fetched bodies into spooled temporary files (memory up to ``_SPOOL_BYTES``, then disk),
  hashing them on the way; images are validated from those files and uploads from the files the
  multipart parser spooled them to, and storage copies from the file: a large input is never a
  ``bytes`` object;
- downloads at most ``max_concurrent_fetches`` URLs at once across the process;
- closes its temporary files and gives its bytes back when the request ends, accepted or not.

Everything here that touches bytes, Pillow, DNS, sockets or boto3 runs in a worker thread so the
event loop keeps serving other requests while a 20 MB upload is decoded.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import IO, TypeVar
from urllib.parse import unquote, urlsplit

from starlette.concurrency import run_in_threadpool

from masactrl_jobs import netguard
from masactrl_jobs.images import (
    InvalidImage,
    Payload,
    StoredInput,
    ValidatedImage,
    decode_data_url,
    payload_size,
    too_large_message,
    validate_image,
)
from masactrl_jobs.media import VideoInfo, probe_video
from masactrl_jobs.storage import (
    InvalidKey,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageError,
    StorageUnavailable,
    validate_key,
)
from service.budget import InflightBytes, RequestBudget
from service.config import GatewaySettings
from service.errors import FieldError

__all__ = ["ImageIntake", "RequestIntake", "StoredInput"]

Loc = Sequence[str | int]
T = TypeVar("T")

# A fetched body stays in memory up to this size, then moves to a temporary file on disk.
_SPOOL_BYTES = 1024 * 1024
_CHUNK = 1024 * 1024
# The storage key of an earlier input, as a job object shows it (``ValidatedImage.key``).
_INPUT_KEY = re.compile(r"inputs/[0-9a-f]{64}\.(?:png|jpg|webp)")


class ImageIntake:
    """The process's side of input intake: storage, the reference rules, the shared budget."""

    def __init__(self, settings: GatewaySettings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        parts = urlsplit(settings.storage_url)
        # s3:// references are accepted only inside the service's own bucket and prefix.
        self.bucket = parts.netloc if parts.scheme == "s3" else None
        self.prefix = unquote(parts.path).strip("/")
        self.inflight = InflightBytes(settings.max_inflight_input_bytes)
        self.fetches = asyncio.Semaphore(settings.max_concurrent_fetches)

    async def stored(self, key: str) -> bool:
        """Whether the input stored under ``key`` is still kept (a retry reuses it)."""
        return bool(await run_in_threadpool(self.storage.exists, key))

    @asynccontextmanager
    async def request(self) -> AsyncIterator[RequestIntake]:
        """One request's intake; its files are closed and its bytes given back on exit."""
        intake = RequestIntake(self)
        try:
            yield intake
        finally:
            await run_in_threadpool(intake.close)


class RequestIntake:
    """Reads one request's inputs against its byte budget (``masactrl_jobs.kinds.base.Intake``)."""

    def __init__(self, shared: ImageIntake) -> None:
        self.shared = shared
        self.settings = shared.settings
        self.budget = RequestBudget(shared.settings.max_request_input_bytes, shared.inflight)
        # What each reference gave, by (what it was read as, its normalized form).
        self._read: dict[tuple[str, str], ValidatedImage | StoredInput] = {}
        self._files: list[IO[bytes]] = []

    # -- the Intake protocol

    async def read(self, ref: str, loc: Loc, what: str = "image") -> ValidatedImage:
        """Fetch or decode ``ref`` and validate it, storing nothing; FieldError on bad input."""
        key = ("image", _reference_key(ref))
        known = self._read.get(key)
        if isinstance(known, ValidatedImage):
            return known  # the same reference again: read, charged and validated once
        data, digest = await self._load(ref, loc, what, self.settings.max_image_bytes)
        image = await self._validate(data, loc, what, digest)
        self._read[key] = image
        return image

    async def check(self, data: Payload, loc: Loc, what: str = "image") -> ValidatedImage:
        """Validate uploaded bytes (or their spooled file), storing nothing."""
        self.budget.charge(payload_size(data), loc, what)
        return await self._validate(data, loc, what, None)

    async def read_video(self, ref: str, loc: Loc, max_bytes: int) -> StoredInput:
        """The video ``ref`` names in a temporary file, hashed on the way; not yet probed."""
        key = ("video", _reference_key(ref))
        known = self._read.get(key)
        if isinstance(known, StoredInput):
            return known
        # Probing reads a path (PyAV), so a video always lands in a named file: a fetched one
        # directly, one from data: or s3: bytes by a copy.
        data, digest = await self._load(ref, loc, "video", max_bytes, named=True)
        size = payload_size(data)
        if size > max_bytes:  # s3:// objects are read whole
            raise FieldError(loc, too_large_message("video", size, max_bytes), "too_large")
        if isinstance(data, bytes) or digest is None:
            video = await run_in_threadpool(self._named_copy, data, digest)
        else:
            video = StoredInput(data, "video", sha256=digest)
        self._read[key] = video
        return video

    async def check_video(self, data: Payload, loc: Loc, max_bytes: int) -> StoredInput:
        """An uploaded video, copied from its spooled part into a named temporary file."""
        size = payload_size(data)
        if size > max_bytes:
            raise FieldError(loc, too_large_message("video", size, max_bytes), "too_large")
        self.budget.charge(size, loc, "video")
        return await run_in_threadpool(self._named_copy, data, None)

    async def probe_video(self, video: StoredInput, count_up_to: int) -> VideoInfo:
        """A video's size and duration, its frames counted by demuxing up to ``count_up_to + 1``
        (``MediaError`` when unreadable)."""
        data = video.data
        source = data if isinstance(data, bytes) else str(getattr(data, "name", ""))
        return await run_in_threadpool(probe_video, source, count_up_to=count_up_to)

    # -- storing and closing

    async def store(self, images: Sequence[ValidatedImage | StoredInput]) -> None:
        """Store validated inputs under ``inputs/<sha256>.<ext>``, each copied from its file.

        Called once every check of the request has passed, so a refused request stores nothing.
        """
        for image in {image.key: image for image in images}.values():
            # Always written (not "if absent"): content addressing makes it idempotent, and it
            # restores an object the retention sweeper may be removing at this very moment.
            await run_in_threadpool(
                self.shared.storage.put, image.key, image.data, image.content_type
            )

    def close(self) -> None:
        """Close this request's temporary files and give its bytes back to the process."""
        for file in self._files:
            file.close()
        self._files.clear()
        self._read.clear()
        self.budget.release()

    # -- reading

    async def _validate(
        self, data: Payload, loc: Loc, what: str, digest: str | None
    ) -> ValidatedImage:
        try:
            return await run_in_threadpool(
                validate_image,
                data,
                max_bytes=self.settings.max_image_bytes,
                max_side=self.settings.max_image_side,
                what=what,
                sha256=digest,
            )
        except InvalidImage as exc:
            raise FieldError(loc, str(exc), "invalid_image") from None

    def _temporary(self, named: bool) -> IO[bytes]:
        """A temporary file closed (and so removed) with the request: spooled (in memory up to
        ``_SPOOL_BYTES``), or on disk under a name when a path is needed."""
        file: IO[bytes]
        if named:
            file = tempfile.NamedTemporaryFile(prefix="masactrl-input-")  # noqa: SIM115
        else:
            file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115
        self._files.append(file)
        return file

    def _named_copy(self, data: Payload, digest: str | None) -> StoredInput:
        """``data`` in a named temporary file (closed with the request), with its digest."""
        file = self._temporary(named=True)
        hasher = hashlib.sha256()
        if isinstance(data, bytes):
            file.write(data)
            hasher.update(data)
        else:
            data.seek(0)
            while chunk := data.read(_CHUNK):
                file.write(chunk)
                if digest is None:
                    hasher.update(chunk)
        file.flush()
        return StoredInput(file, "video", sha256=digest or hasher.hexdigest())

    async def _load(
        self, ref: str, loc: Loc, what: str, max_bytes: int, named: bool = False
    ) -> tuple[Payload, str | None]:
        """The bytes ``ref`` names, charged to the budget, and their digest when it was taken
        on the way (a fetch lands in a named file when ``named``)."""
        scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
        if scheme == "data":
            try:
                data = await run_in_threadpool(decode_data_url, ref, max_bytes=max_bytes, what=what)
            except InvalidImage as exc:
                raise FieldError(loc, str(exc), "invalid_image") from None
            self.budget.charge(len(data), loc, what)
            return data, None
        if scheme in ("https", "http"):
            return await self._fetch(ref, loc, what, max_bytes, named)
        if scheme == "s3":
            data = await self._from_bucket(ref, loc, what)
            self.budget.charge(len(data), loc, what)
            return data, None
        if not scheme and _INPUT_KEY.fullmatch(ref):
            data = await self._stored(ref, ref, loc, what)
            self.budget.charge(len(data), loc, what)
            return data, None
        raise FieldError(
            loc,
            f"{what} must be a data: URL, an https:// URL, an s3:// URL inside the service's "
            "bucket or an earlier input's key (inputs/<sha256>.<ext>)",
            "invalid_image_reference",
        )

    async def _fetch(
        self, url: str, loc: Loc, what: str, max_bytes: int, named: bool
    ) -> tuple[Payload, str]:
        file = self._temporary(named)
        hasher = hashlib.sha256()

        def write(chunk: bytes) -> None:
            # Charged before it is kept: a body past the budget stops the download here.
            self.budget.charge(len(chunk), loc, what)
            hasher.update(chunk)
            file.write(chunk)

        async with self.shared.fetches:
            await self._guarded(
                lambda: netguard.fetch_into(
                    url,
                    write,
                    max_bytes=max_bytes,
                    timeout=self.settings.fetch_timeout_seconds,
                    allow_loopback_http=self.settings.allow_loopback_http,
                ),
                loc,
                what,
            )
        file.flush()
        return file, hasher.hexdigest()

    async def _guarded(self, call: Callable[[], T], loc: Loc, what: str) -> T:
        try:
            return await run_in_threadpool(call)
        except netguard.UnsafeURL as exc:
            raise FieldError(loc, str(exc), "unsafe_url") from None
        except netguard.ResponseTooLarge as exc:
            raise FieldError(loc, f"{what} URL: {exc}", "image_too_large") from None
        except netguard.FetchError as exc:
            raise FieldError(loc, f"{what} could not be fetched: {exc}", "fetch_failed") from None

    async def _from_bucket(self, ref: str, loc: Loc, what: str) -> bytes:
        parts = urlsplit(ref)
        full_key = unquote(parts.path).lstrip("/")
        bucket, prefix = self.shared.bucket, self.shared.prefix
        inside = (
            bucket is not None
            and isinstance(self.shared.storage, S3Storage)
            and parts.netloc == bucket
            and (not prefix or full_key.startswith(prefix + "/"))
        )
        if not inside:
            where = f"s3://{bucket}/{prefix}".rstrip("/") if bucket else None
            hint = f" ({where}/...)" if where else " (this deployment stores files locally)"
            raise FieldError(
                loc,
                f"{what}: only s3:// URLs inside the service's own bucket are accepted{hint}",
                "foreign_bucket",
            )
        key = full_key[len(prefix) + 1 :] if prefix else full_key
        return await self._stored(key, ref, loc, what)

    async def _stored(self, key: str, ref: str, loc: Loc, what: str) -> bytes:
        """The object at storage ``key`` (which ``ref`` named), or a FieldError."""
        try:
            validate_key(key)
            return await run_in_threadpool(self.shared.storage.get, key)
        except InvalidKey as exc:
            raise FieldError(loc, str(exc), "invalid_image_reference") from None
        except ObjectNotFound:
            raise FieldError(loc, f"{what}: no object at {ref}", "not_found") from None
        except StorageUnavailable:
            raise
        except StorageError as exc:
            raise FieldError(loc, f"{what}: {exc}", "invalid_image_reference") from None


def _reference_key(ref: str) -> str:
    """What makes two references the same input: a URL as its server receives it, anything
    else (data:, s3:) as written."""
    scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
    return netguard.normalized_url(ref) if scheme in ("https", "http") else ref
