"""Settings shared by every process (gateway, GPU workers, webhook worker).

Each process has exactly one pydantic-settings class that subclasses :class:`CommonSettings`; all
of them read ``MASACTRL_*`` environment variables (and a ``.env`` file in the working directory).
Build them with :func:`load_settings` to turn a validation failure into a readable
:class:`ConfigurationError` that names the environment variables at fault.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from masactrl_jobs.store.connection import RedisTarget

logger = logging.getLogger(__name__)

ENV_PREFIX = "MASACTRL_"
MiB = 1024 * 1024

# Values people paste from templates; refusing them in production is cheaper than a leaked key.
PLACEHOLDER_SECRETS = frozenset(
    {
        "changethis",
        "change-this",
        "change_me",
        "changeme",
        "change-me",
        "secret",
        "password",
        "placeholder",
        "example",
        "test",
        "xxx",
        "todo",
        "replace-me",
    }
)
MIN_SECRET_LENGTH = 32


def _default_storage_url() -> str:
    return (Path("var/storage").resolve()).as_uri()


def is_placeholder_secret(value: str) -> bool:
    """True for empty, template-like or obviously low-entropy secrets."""
    stripped = value.strip()
    lowered = stripped.lower()
    return (
        not stripped
        or lowered in PLACEHOLDER_SECRETS
        or lowered.startswith(("changethis", "change-me", "changeme", "your-", "<"))
        or len(set(stripped)) < 4
    )


def development_signing_secret(storage_url: str) -> str:
    """The URL signing secret of a development setup that configures none.

    Derived, not random: the gateway and the workers must agree on it without sharing anything,
    and it is only ever used on a development machine.
    """
    return hashlib.sha256(f"masactrl development url signing:{storage_url}".encode()).hexdigest()


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """``host:port,host:port`` as address pairs; a ValueError that says which entry is wrong."""
    addresses = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{entry!r} is not host:port; write a comma-separated list such as "
                "sentinel-0:26379,sentinel-1:26379"
            )
        addresses.append((host, int(port)))
    if text.strip() and not addresses:
        raise ValueError(f"{text!r} names no sentinel; write host:port,host:port")
    return tuple(addresses)


class ConfigurationError(ValueError):
    """Settings could not be built; the message lists each problem on its own line."""


class CommonSettings(BaseSettings):
    """What the gateway and the workers share; their own settings classes subclass this."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    queue_policy: Literal["fair", "fifo"] = Field(
        "fair",
        description="Which queued job a free worker starts: `fair` (fair share between "
        "tenants by weight, then priority, then submission order) or `fifo` (submission order "
        "across all tenants, as Celery delivers; for comparison).",
    )
    environment: Literal["development", "production"] = Field(
        "production",
        description="`production` refuses unsafe defaults; `development` relaxes them.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "Redis for jobs and the broker. With sentinels, its db number, user, password and "
            "scheme (rediss:// for TLS) apply to the master and its host and port are ignored."
        ),
    )
    redis_sentinels: str | None = Field(
        None,
        description=(
            "`host:port,host:port,...` of Redis Sentinels; with `MASACTRL_REDIS_SENTINEL_MASTER`, "
            "every process follows the master they name (job store and Celery broker)."
        ),
    )
    redis_sentinel_master: str | None = Field(
        None, description="The master's name in Sentinel (`sentinel monitor <name> ...`)."
    )
    redis_sentinel_password: SecretStr | None = Field(
        None, description="Password of the sentinels themselves (`requirepass` in sentinel.conf)."
    )
    redis_wait_replicas: int = Field(
        1,
        ge=0,
        le=16,
        description=(
            "With sentinels: replicas that must acknowledge a job's enqueue, start and end "
            "(`WAIT`) before the store returns; 0 turns the wait off."
        ),
    )
    redis_wait_timeout_ms: int = Field(
        500,
        ge=1,
        le=60_000,
        description="How long a write waits for its replicas before going on without them.",
    )

    storage_url: str = Field(
        default_factory=_default_storage_url,
        description="`file:///absolute/path` or `s3://bucket/prefix`.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, R2, moto); unset means AWS."
    )
    s3_public_endpoint_url: str | None = Field(
        None,
        description="Endpoint used in presigned URLs when clients reach S3 by another address.",
    )
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_region: str | None = None

    url_signing_secret: SecretStr | None = Field(
        None, description="HMAC key for signed file:// URLs; required in production."
    )
    public_base_url: str = Field(
        "http://127.0.0.1:8000", description="Base of signed file URLs served by the gateway."
    )
    presigned_url_ttl_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)
    job_retention_seconds: int = Field(7 * 24 * 3600, ge=60)

    catalog_file: Path | None = Field(None, description="Path of a JSON model catalog.")
    catalog: str | None = Field(None, description="Inline JSON model catalog.")

    allow_loopback_http: bool = Field(
        False, description="Development only: let the SSRF guard reach loopback addresses."
    )
    max_image_bytes: int = Field(20 * MiB, ge=1024)
    max_image_side: int = Field(
        4096,
        ge=64,
        le=16384,
        description="Longest side of an image, a mask or a video's frame, in pixels.",
    )
    max_video_pixels: int = Field(
        128 * 1024 * 1024,
        ge=64 * 64,
        description=(
            "Most pixels a video's decoded frames may hold together (frames × width × height; "
            "3 bytes each once decoded): checked at the gateway and again before a worker "
            "decodes."
        ),
    )
    fetch_timeout_seconds: float = Field(10.0, gt=0, le=120)

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise ValueError(
                    f"{value!r} is not an absolute file URL; write file:///absolute/path "
                    "(three slashes)"
                )
            return value
        if parts.scheme == "s3":
            if not parts.netloc:
                raise ValueError(f"{value!r} names no bucket; write s3://bucket/optional/prefix")
            if parts.query or parts.fragment:
                raise ValueError(f"{value!r} must not carry a query or fragment")
            return value
        raise ValueError(
            f"{value!r} is not supported; use file:///absolute/path or s3://bucket/prefix"
        )

    @field_validator("public_base_url", "s3_endpoint_url", "s3_public_endpoint_url")
    @classmethod
    def _check_http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL such as https://host:port")
        return value

    @field_validator(
        "s3_region",
        "s3_access_key_id",
        "redis_sentinels",
        "redis_sentinel_master",
        "redis_sentinel_password",
        "s3_secret_access_key",
        "url_signing_secret",
        "catalog",
        "catalog_file",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # `MASACTRL_CATALOG_FILE=` in an env file means "not set", not "the current directory".
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return ",".join(f"{host}:{port}" for host, port in parse_sentinels(value))

    @model_validator(mode="after")
    def _check_environment_rules(self) -> CommonSettings:
        production = self.environment == "production"
        if production and self.allow_loopback_http:
            raise ValueError(
                "MASACTRL_ALLOW_LOOPBACK_HTTP is a development escape hatch and is refused when "
                "MASACTRL_ENVIRONMENT=production"
            )
        secret = self.url_signing_secret.get_secret_value() if self.url_signing_secret else None
        if production:
            if secret is None:
                raise ValueError(
                    "MASACTRL_URL_SIGNING_SECRET is required in production; generate one with "
                    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
                )
            if is_placeholder_secret(secret) or len(secret) < MIN_SECRET_LENGTH:
                raise ValueError(
                    "MASACTRL_URL_SIGNING_SECRET looks like a placeholder or is shorter than "
                    f"{MIN_SECRET_LENGTH} characters; set a random value in production"
                )
        if self.catalog is not None and self.catalog_file is not None:
            raise ValueError("set MASACTRL_CATALOG or MASACTRL_CATALOG_FILE, not both")
        if (self.redis_sentinels is None) != (self.redis_sentinel_master is None):
            given, missing = (
                ("MASACTRL_REDIS_SENTINELS", "MASACTRL_REDIS_SENTINEL_MASTER")
                if self.redis_sentinels
                else ("MASACTRL_REDIS_SENTINEL_MASTER", "MASACTRL_REDIS_SENTINELS")
            )
            raise ValueError(
                f"{given} is set but {missing} is not; Sentinel needs both (the sentinels' "
                "host:port list and the name of the master they monitor), or neither"
            )
        return self

    @property
    def redis_target(self) -> RedisTarget:
        """Where the job store and the broker find Redis: the URL, or the Sentinel master."""
        from masactrl_jobs.store.connection import RedisTarget  # redis only where it is used

        password = self.redis_sentinel_password
        return RedisTarget(
            url=self.redis_url,
            sentinels=parse_sentinels(self.redis_sentinels or ""),
            sentinel_master=self.redis_sentinel_master,
            sentinel_password=password.get_secret_value() if password else None,
            wait_replicas=self.redis_wait_replicas if self.redis_sentinels else 0,
            wait_timeout_ms=self.redis_wait_timeout_ms,
        )

    @property
    def uses_development_signing_secret(self) -> bool:
        """Whether URLs are signed with the secret derived from the storage URL (development)."""
        secret = self.url_signing_secret
        return not self.is_production and (secret is None or not secret.get_secret_value().strip())

    @property
    def signing_key(self) -> bytes:
        """The URL signing secret as bytes: the configured one, or in development a derived one."""
        if self.uses_development_signing_secret:
            return development_signing_secret(self.storage_url).encode()
        # Production without a secret was refused by validation.
        assert self.url_signing_secret is not None
        return self.url_signing_secret.get_secret_value().encode()

    @property
    def is_production(self) -> bool:
        return self.environment == "production"


SettingsT = TypeVar("SettingsT", bound=CommonSettings)


def env_var_name(settings_cls: type[BaseSettings], field: str) -> str:
    """The environment variable that sets ``field`` (``MASACTRL_REDIS_URL`` for ``redis_url``)."""
    prefix = settings_cls.model_config.get("env_prefix", "") or ""
    return f"{prefix}{field}".upper()


def describe_validation_error(settings_cls: type[BaseSettings], exc: ValidationError) -> str:
    """One line per problem, naming the environment variable rather than the Python field."""
    lines = []
    for error in exc.errors(include_url=False):
        location = [str(part) for part in error.get("loc", ())]
        message = error.get("msg", "invalid value")
        message = message.removeprefix("Value error, ")
        if location:
            name = env_var_name(settings_cls, location[0])
            suffix = "".join(f"[{part}]" for part in location[1:])
            lines.append(f"{name}{suffix}: {message}")
        else:
            lines.append(message)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(settings_cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """Build ``settings_cls`` from the environment, raising :class:`ConfigurationError` on error.

    Processes call this once at start-up; it also says which development defaults are in use.
    """
    try:
        settings = settings_cls(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(settings_cls, exc)) from None
    if settings.uses_development_signing_secret:
        logger.warning(
            "MASACTRL_URL_SIGNING_SECRET is not set; using a development secret derived from "
            "the storage URL (never do this in production)"
        )
    return settings
