"""Object storage behind one small interface, with an S3 and a local-file backend.

Keys are relative POSIX paths such as ``inputs/<sha256>.png`` or ``results/<job_id>/target_0.png``.
``storage_from_settings`` picks the backend from ``MASACTRL_STORAGE_URL``:

- ``s3://bucket/prefix``: any S3-compatible server through boto3; ``url()`` is a presigned GET.
- ``file:///path``: a directory on this machine; ``url()`` points at the gateway's
  ``/v1/files/{key}`` route, signed with HMAC-SHA256 and an expiry that :meth:`FileStorage.verify`
  checks.

Transient failures raise :class:`StorageUnavailable` (callers retry); a missing object raises
:class:`ObjectNotFound`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import mimetypes
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    from masactrl_jobs.settings import CommonSettings

__all__ = [
    "FileStorage",
    "InvalidKey",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "content_type_for",
    "preview_key",
    "previews_prefix",
    "result_key",
    "results_prefix",
    "animation_key",
    "storage_from_settings",
    "validate_key",
]

MAX_KEY_LENGTH = 512
# Conservative on purpose: keys appear in URLs, S3 object names and file paths alike.
_SEGMENT = re.compile(r"^[A-Za-z0-9_.=+-]+$")
_TMP_PREFIX = ".tmp-"
# Copying a file into storage holds one chunk at a time.
_COPY_CHUNK = 1024 * 1024


class StorageError(Exception):
    """A storage operation failed for a reason retrying will not fix."""


class StorageUnavailable(StorageError):
    """The storage backend is unreachable or failing; retrying later may succeed."""


class ObjectNotFound(StorageError, KeyError):
    """No object is stored under the key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:  # KeyError would print the repr of the key
        return f"no object stored under {self.key!r}"


class InvalidKey(StorageError, ValueError):
    """A key that could escape its namespace or is not a plain relative path."""


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a safe relative path; raise :class:`InvalidKey` otherwise.

    With ``prefix=True`` a trailing ``/`` is allowed (``results/<id>/``).
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("storage key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"storage key is longer than {MAX_KEY_LENGTH} characters")
    body = key[:-1] if prefix and key.endswith("/") else key
    segments = body.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise InvalidKey(
                f"storage key {key!r} must be a relative path of letters, digits and . _ = + -"
                " without empty, '.' or '..' parts"
            )
    if segments[-1].startswith(_TMP_PREFIX):
        raise InvalidKey(f"storage key {key!r} uses the reserved prefix {_TMP_PREFIX!r}")
    return key


def results_prefix(job_id: str) -> str:
    """Where a job's images live (``results/<job_id>/``); retention deletes the whole prefix."""
    return f"results/{job_id}/"


def result_key(job_id: str, role: str, index: int) -> str:
    """``results/<job_id>/source_0.png``, ``results/<job_id>/target_<k>.png``; a rerun reuses it."""
    return f"{results_prefix(job_id)}{role}_{index}.png"


def animation_key(job_id: str, extension: str) -> str:
    """``results/<job_id>/sequence.mp4`` or ``.webp``: a sequence job's animation."""
    return f"{results_prefix(job_id)}sequence.{extension}"


def previews_prefix(job_id: str) -> str:
    """Where a running job's live previews live (``results/<job_id>/previews/``): inside its
    results, so whatever removes those (retention, a failure, a cancel) removes them too."""
    return f"{results_prefix(job_id)}previews/"


def preview_key(job_id: str, step: int, role: str, index: int) -> str:
    """``results/<job_id>/previews/<step>/<role>_<index>.webp``: one image of the preview after
    ``step``. A new key per step, so a browser never shows a cached older image under its URL."""
    return f"{previews_prefix(job_id)}{step}/{role}_{index}.webp"


def content_type_for(key: str) -> str:
    """The media type to serve ``key`` with, from its extension."""
    ext = key.rsplit(".", 1)[-1].lower() if "." in key else ""
    known = {
        "png": "image/png",
        "jpg": "image/jpeg",
        "jpeg": "image/jpeg",
        "webp": "image/webp",
        "mp4": "video/mp4",
        "json": "application/json",
        "safetensors": "application/octet-stream",
    }
    return known.get(ext) or mimetypes.guess_type(key)[0] or "application/octet-stream"


@runtime_checkable
class Storage(Protocol):
    """What gateway and workers need from object storage."""

    def put(
        self, key: str, data: bytes | IO[bytes], content_type: str = "application/octet-stream"
    ) -> None:
        """Store ``data`` under ``key``, replacing any previous object atomically.

        ``data`` may be a seekable binary file (a spooled upload): it is copied from its start
        a chunk at a time, never read whole into memory.
        """

    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectNotFound` when absent."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    def delete(self, key: str) -> None:
        """Remove one object; absent objects are not an error."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with ``prefix``; return how many."""

    def list_prefix(self, prefix: str) -> list[str]:
        """Keys that start with ``prefix``, sorted."""

    def url(self, key: str, expires_in: int | None = None) -> str:
        """A URL that lets anyone GET the object for ``expires_in`` seconds."""

    def healthy(self) -> bool:
        """Whether the backend answers (for /readyz)."""


def _check_prefix(prefix: str) -> str:
    # Deleting "everything" must be spelled out by the caller, never reached by an empty string.
    if not prefix:
        raise InvalidKey("prefix must not be empty")
    return validate_key(prefix, prefix=True)


class FileStorage:
    """Objects as files under a root directory; the gateway serves them through signed URLs."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        signing_key: bytes,
        public_base_url: str = "http://127.0.0.1:8000",
        default_expires_in: int = 3600,
    ) -> None:
        if not signing_key:
            raise ValueError("FileStorage needs a non-empty signing key")
        self.root = Path(root).resolve()
        self._signing_key = signing_key
        self.public_base_url = public_base_url.rstrip("/")
        self.default_expires_in = default_expires_in
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create storage directory {self.root}: {exc}") from exc

    def __repr__(self) -> str:
        return f"FileStorage({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """The file that holds ``key`` (validated, always inside the root)."""
        path = self.root.joinpath(*validate_key(key).split("/"))
        # Belt and braces: validate_key already forbids '..', this also catches symlinked parents.
        if not path.resolve().is_relative_to(self.root):
            raise InvalidKey(f"storage key {key!r} resolves outside the storage root")
        return path

    def put(
        self, key: str, data: bytes | IO[bytes], content_type: str = "application/octet-stream"
    ) -> None:
        path = self.path_for(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write to a temporary file in the same directory, then rename: readers see either
            # the old object or the complete new one, never a partial write.
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as handle:
                    if isinstance(data, bytes):
                        handle.write(data)
                    else:
                        data.seek(0)
                        shutil.copyfileobj(data, handle, _COPY_CHUNK)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp_name, 0o644)
                os.replace(tmp_name, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
                raise
        except OSError as exc:
            raise StorageUnavailable(f"cannot write {key!r}: {exc.strerror or exc}") from exc

    def get(self, key: str) -> bytes:
        path = self.path_for(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read {key!r}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            return
        except OSError as exc:
            raise StorageUnavailable(f"cannot delete {key!r}: {exc.strerror or exc}") from exc
        self._prune_empty(path.parent)

    def _iter_keys(self, prefix: str) -> Iterator[tuple[str, Path]]:
        # Walk only the deepest directory the prefix names, not the whole root.
        directory, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*directory.split("/")) if directory else self.root
        if not start.is_dir():
            return
        for dirpath, _dirnames, filenames in os.walk(start):
            for filename in filenames:
                if filename.startswith(_TMP_PREFIX):
                    continue
                path = Path(dirpath, filename)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key, path

    def list_prefix(self, prefix: str) -> list[str]:
        _check_prefix(prefix)
        try:
            return sorted(key for key, _ in self._iter_keys(prefix))
        except OSError as exc:
            raise StorageUnavailable(f"cannot list {prefix!r}: {exc.strerror or exc}") from exc

    def delete_prefix(self, prefix: str) -> int:
        _check_prefix(prefix)
        removed = 0
        try:
            for _key, path in list(self._iter_keys(prefix)):
                path.unlink(missing_ok=True)
                removed += 1
                self._prune_empty(path.parent)
        except OSError as exc:
            raise StorageUnavailable(f"cannot delete {prefix!r}: {exc.strerror or exc}") from exc
        return removed

    def _prune_empty(self, directory: Path) -> None:
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:
                return  # not empty (or already gone): stop climbing
            directory = directory.parent

    def _signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def url(self, key: str, expires_in: int | None = None) -> str:
        validate_key(key)
        lifetime = self.default_expires_in if expires_in is None else expires_in
        if lifetime <= 0:
            raise ValueError("expires_in must be positive")
        expires = int(time.time()) + int(lifetime)
        signature = self._signature(key, expires)
        return (
            f"{self.public_base_url}/v1/files/{quote(key, safe='/')}"
            f"?expires={expires}&signature={signature}"
        )

    def verify(
        self, key: str, expires: int | str, signature: str, *, now: float | None = None
    ) -> bool:
        """Whether a ``/v1/files/{key}`` request carries a valid, unexpired signature."""
        try:
            validate_key(key)
            expires_at = int(expires)
        except (InvalidKey, TypeError, ValueError):
            return False
        if not isinstance(signature, str) or len(signature) != 64:
            return False
        expected = self._signature(key, expires_at)
        # Compare before looking at the clock so timing says nothing about which check failed.
        valid = hmac.compare_digest(expected.encode(), signature.lower().encode())
        current = time.time() if now is None else now
        return valid and expires_at > current

    def healthy(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK | os.X_OK)


class S3Storage:
    """Objects in an S3-compatible bucket, under an optional key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str | None = None,
        default_expires_in: int = 3600,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
    ) -> None:
        # boto3 costs a noticeable import; only processes that use S3 pay it.
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.default_expires_in = default_expires_in
        config = Config(
            signature_version="s3v4",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Standard mode retries throttling and 5xx a few times before we see an error.
            retries={"max_attempts": 3, "mode": "standard"},
            # Custom endpoints (MinIO, moto, R2) rarely do virtual-hosted buckets.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # Readiness probes must answer fast: short timeouts and no retries.
        self._health_client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            config=config.merge(
                Config(connect_timeout=2, read_timeout=2, retries={"max_attempts": 1})
            ),
        )
        # Presigned URLs embed the host they were signed for, so clients that reach the server
        # by another name (compose service vs. localhost) need a client signing for that name.
        self._presign_client = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self._client
        )

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full_prefix(self, prefix: str) -> str:
        _check_prefix(prefix)
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def _strip(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def _translate(self, exc: Exception, action: str, key: str) -> StorageError:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(key)
            if (
                status >= 500
                or status == 429
                or code in ("SlowDown", "Throttling", "RequestTimeout")
            ):
                return StorageUnavailable(f"S3 {action} {key!r} failed: {code or status}")
            return StorageError(f"S3 {action} {key!r} failed: {code} {error.get('Message', '')}")
        if isinstance(exc, BotoCoreError):
            # Endpoint unreachable, timeouts, connection resets: all worth a retry.
            return StorageUnavailable(f"S3 {action} {key!r} failed: {exc}")
        return StorageError(f"S3 {action} {key!r} failed: {exc}")

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, action, key) from exc

    def put(
        self, key: str, data: bytes | IO[bytes], content_type: str = "application/octet-stream"
    ) -> None:
        full = self._full(key)
        if not isinstance(data, bytes):
            data.seek(0)  # botocore streams a file body from where it stands
        with self._errors("put", key):
            self._client.put_object(
                Bucket=self.bucket, Key=full, Body=data, ContentType=content_type
            )

    def get(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors("get", key):
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            body: bytes = response["Body"].read()  # boto3's client is untyped
            return body

    def exists(self, key: str) -> bool:
        full = self._full(key)
        try:
            with self._errors("head", key):
                self._client.head_object(Bucket=self.bucket, Key=full)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=full)

    def _iter_full_keys(self, prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix)):
            for item in page.get("Contents", []):
                yield item["Key"]

    def list_prefix(self, prefix: str) -> list[str]:
        with self._errors("list", prefix):
            return sorted(self._strip(full) for full in self._iter_full_keys(prefix))

    def delete_prefix(self, prefix: str) -> int:
        removed = 0
        with self._errors("delete", prefix):
            batch: list[dict[str, Any]] = []
            for full in list(self._iter_full_keys(prefix)):
                batch.append({"Key": full})
                if len(batch) == 1000:  # the DeleteObjects limit
                    removed += self._delete_batch(batch)
                    batch = []
            if batch:
                removed += self._delete_batch(batch)
        return removed

    def _delete_batch(self, batch: list[dict[str, Any]]) -> int:
        response = self._client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
        )
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageUnavailable(
                f"S3 could not delete {len(errors)} objects (first: {first.get('Key')}: "
                f"{first.get('Code')})"
            )
        return len(batch)

    def url(self, key: str, expires_in: int | None = None) -> str:
        full = self._full(key)
        lifetime = self.default_expires_in if expires_in is None else expires_in
        if lifetime <= 0:
            raise ValueError("expires_in must be positive")
        with self._errors("presign", key):
            url: str = self._presign_client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": full},
                ExpiresIn=int(lifetime),
            )
            return url

    def healthy(self) -> bool:
        try:
            self._health_client.head_bucket(Bucket=self.bucket)
        except Exception:  # any failure means "not ready"; the probe reports, never raises
            return False
        return True


def storage_from_settings(settings: CommonSettings) -> FileStorage | S3Storage:
    """The backend ``settings.storage_url`` names, configured from the other storage settings."""
    parts = urlsplit(settings.storage_url)
    if parts.scheme == "file":
        return FileStorage(
            unquote(parts.path),
            signing_key=settings.signing_key,
            public_base_url=settings.public_base_url,
            default_expires_in=settings.presigned_url_ttl_seconds,
        )
    if parts.scheme == "s3":
        secret = settings.s3_secret_access_key
        return S3Storage(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
            region=settings.s3_region,
            default_expires_in=settings.presigned_url_ttl_seconds,
        )
    raise ValueError(f"unsupported storage URL {settings.storage_url!r}")
