"""Image inputs: resolve a reference (data:, https:, s3:) or an upload, validate it, store it.

Reading and validating store nothing; :meth:`ImageIntake.store` runs after every check of the
request, so nothing a refused request sent outlives it.

Everything here that touches bytes, Pillow, DNS, sockets or boto3 runs in a worker thread so the
event loop keeps serving other requests while a 20 MB upload is decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

from starlette.concurrency import run_in_threadpool

from masactrl_jobs import netguard
from masactrl_jobs.images import (
    InvalidImage,
    StoredInput,
    ValidatedImage,
    decode_data_url,
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
from service.config import GatewaySettings
from service.errors import FieldError

__all__ = ["ImageIntake", "StoredInput"]

Loc = Sequence[str | int]


class ImageIntake:
    """Turns image references from requests into content-addressed ``inputs/`` keys."""

    def __init__(self, settings: GatewaySettings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        parts = urlsplit(settings.storage_url)
        # s3:// references are accepted only inside the service's own bucket and prefix.
        self.bucket = parts.netloc if parts.scheme == "s3" else None
        self.prefix = unquote(parts.path).strip("/")

    async def read_bytes(self, ref: str, loc: Loc, what: str, max_bytes: int) -> bytes:
        """The bytes ``ref`` names, checked only against ``max_bytes`` (a video: probed later)."""
        data = await self._load(ref, loc, what, max_bytes)
        if len(data) > max_bytes:  # s3:// objects are read whole
            raise FieldError(loc, too_large_message(what, len(data), max_bytes), "too_large")
        return data

    async def read(self, ref: str, loc: Loc, what: str = "image") -> ValidatedImage:
        """Fetch or decode ``ref`` and validate it, storing nothing; FieldError on bad input."""
        data = await self._load(ref, loc, what, self.settings.max_image_bytes)
        return await self.check(data, loc, what)

    async def check(self, data: bytes, loc: Loc, what: str = "image") -> ValidatedImage:
        """Validate uploaded bytes, storing nothing; FieldError on bad input."""
        try:
            return await run_in_threadpool(
                validate_image,
                data,
                max_bytes=self.settings.max_image_bytes,
                max_side=self.settings.max_image_side,
                what=what,
            )
        except InvalidImage as exc:
            raise FieldError(loc, str(exc), "invalid_image") from None

    async def probe_video(self, data: bytes, count_up_to: int) -> VideoInfo:
        """A video's size and duration, its frames counted by demuxing (``MediaError`` when
        unreadable)."""
        return await run_in_threadpool(probe_video, data, count_up_to=count_up_to)

    async def store(self, images: Sequence[ValidatedImage | StoredInput]) -> None:
        """Store validated images under ``inputs/<sha256>.<ext>``.

        Called once every check of the request has passed, so a refused request stores nothing.
        """
        for image in {image.key: image for image in images}.values():
            # Always written (not "if absent"): content addressing makes it idempotent, and it
            # restores an object the retention sweeper may be removing at this very moment.
            await run_in_threadpool(self.storage.put, image.key, image.data, image.content_type)

    async def _load(self, ref: str, loc: Loc, what: str, max_bytes: int) -> bytes:
        scheme = ref.split(":", 1)[0].lower() if ":" in ref else ""
        if scheme == "data":
            try:
                return await run_in_threadpool(decode_data_url, ref, max_bytes=max_bytes, what=what)
            except InvalidImage as exc:
                raise FieldError(loc, str(exc), "invalid_image") from None
        if scheme in ("https", "http"):
            return await self._fetch(ref, loc, what, max_bytes)
        if scheme == "s3":
            return await self._from_bucket(ref, loc, what)
        raise FieldError(
            loc,
            f"{what} must be a data: URL, an https:// URL or an s3:// URL inside the service's "
            "bucket",
            "invalid_image_reference",
        )

    async def _fetch(self, url: str, loc: Loc, what: str, max_bytes: int) -> bytes:
        try:
            return await run_in_threadpool(
                netguard.fetch,
                url,
                max_bytes=max_bytes,
                timeout=self.settings.fetch_timeout_seconds,
                allow_loopback_http=self.settings.allow_loopback_http,
            )
        except netguard.UnsafeURL as exc:
            raise FieldError(loc, str(exc), "unsafe_url") from None
        except netguard.ResponseTooLarge as exc:
            raise FieldError(loc, f"{what} URL: {exc}", "image_too_large") from None
        except netguard.FetchError as exc:
            raise FieldError(loc, f"{what} could not be fetched: {exc}", "fetch_failed") from None

    async def _from_bucket(self, ref: str, loc: Loc, what: str) -> bytes:
        parts = urlsplit(ref)
        full_key = unquote(parts.path).lstrip("/")
        inside = (
            self.bucket is not None
            and isinstance(self.storage, S3Storage)
            and parts.netloc == self.bucket
            and (not self.prefix or full_key.startswith(self.prefix + "/"))
        )
        if not inside:
            where = f"s3://{self.bucket}/{self.prefix}".rstrip("/") if self.bucket else None
            hint = f" ({where}/...)" if where else " (this deployment stores files locally)"
            raise FieldError(
                loc,
                f"{what}: only s3:// URLs inside the service's own bucket are accepted{hint}",
                "foreign_bucket",
            )
        key = full_key[len(self.prefix) + 1 :] if self.prefix else full_key
        try:
            validate_key(key)
            return await run_in_threadpool(self.storage.get, key)
        except InvalidKey as exc:
            raise FieldError(loc, str(exc), "invalid_image_reference") from None
        except ObjectNotFound:
            raise FieldError(loc, f"{what}: no object at {ref}", "not_found") from None
        except StorageUnavailable:
            raise
        except StorageError as exc:
            raise FieldError(loc, f"{what}: {exc}", "invalid_image_reference") from None
