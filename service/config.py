"""Gateway settings: tenants and their keys, limits, and everything in CommonSettings.

API keys are configured by their SHA-256 (``MASACTRL_API_KEYS``), never in plaintext; each maps to
a tenant and the tenant's Standard Webhooks signing secret. ``MASACTRL_DEV_API_KEY`` (plaintext,
development mode only) is the one-key shortcut for a laptop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from masactrl_jobs.schema import PRIORITY_LIMIT
from masactrl_jobs.settings import CommonSettings, is_placeholder_secret

__all__ = ["ApiKeyConfig", "GatewaySettings", "Tenant", "DEV_TENANT"]

DEV_TENANT = "dev"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Tenant names end up inside Redis keys; keep them to a plain alphabet.
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MIN_WEBHOOK_SECRET_BYTES = 24


def _check_webhook_secret(value: str, production: bool) -> None:
    if not value.startswith("whsec_"):
        raise ValueError("a webhook secret must start with 'whsec_' (Standard Webhooks format)")
    if not production:
        return
    try:
        raw = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret must be 'whsec_' followed by base64") from None
    if len(raw) < MIN_WEBHOOK_SECRET_BYTES or is_placeholder_secret(value.removeprefix("whsec_")):
        raise ValueError(
            f"a webhook secret must hold at least {MIN_WEBHOOK_SECRET_BYTES} random bytes in "
            "production"
        )


class ApiKeyConfig(BaseModel):
    """One API key, by hash, and the tenant it authenticates."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(description="Hex SHA-256 of the API key.")
    tenant: str = Field(pattern=TENANT_PATTERN)
    webhook_secret: SecretStr = Field(description="`whsec_` + base64: signs this tenant's hooks.")
    previous_webhook_secrets: list[SecretStr] = Field(
        default_factory=list,
        description="Older secrets still signed with during a rotation (newest first).",
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="The tenant's share of each model's workers against the other tenants with "
        "queued jobs (fair share): a tenant of weight 3 starts three jobs for one of weight 1.",
    )
    priorities: tuple[int, int] = Field(
        (-10, 10),
        description="The lowest and highest `priority` the tenant's jobs may ask for.",
    )

    @field_validator("priorities")
    @classmethod
    def _priority_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not -PRIORITY_LIMIT <= low <= high <= PRIORITY_LIMIT:
            raise ValueError(
                f"must be [lowest, highest] with -{PRIORITY_LIMIT} <= lowest <= highest <= "
                f"{PRIORITY_LIMIT}"
            )
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if not _SHA256_HEX.match(value):
            raise ValueError(
                "must be the 64-hex-digit SHA-256 of the key, e.g. "
                "python -c \"import hashlib; print(hashlib.sha256(b'KEY').hexdigest())\""
            )
        return value


@dataclass(frozen=True)
class Tenant:
    """The authenticated caller."""

    name: str
    webhook_secrets: tuple[str, ...]
    # The queue policy's settings of the tenant's key (ApiKeyConfig).
    weight: float = 1.0
    priorities: tuple[int, int] = (-10, 10)


class GatewaySettings(CommonSettings):
    """Settings of the HTTP gateway process (``MASACTRL_*``)."""

    api_keys: list[ApiKeyConfig] = Field(
        default_factory=list,
        description="JSON list of {sha256, tenant, webhook_secret} (optionally weight and "
        "priorities).",
    )
    dev_api_key: SecretStr | None = Field(
        None, description="Development only: one plaintext key for the tenant 'dev'."
    )
    dev_webhook_secret: SecretStr | None = Field(
        None, description="Development only: the dev tenant's webhook secret (derived if unset)."
    )

    rate_limit_per_second: float = Field(
        10.0, gt=0, description="Job submissions per second per tenant (token refill rate)."
    )
    rate_limit_burst: int = Field(20, ge=1, description="Token bucket size per tenant.")
    max_queue_depth: int = Field(
        100, ge=0, description="Queued jobs per model before 429; 0 means no limit."
    )
    queue_full_retry_after_seconds: int = Field(10, ge=1, le=3600)
    max_wait_seconds: int = Field(60, ge=0, le=60, description="Cap of `Prefer: wait=N`.")
    sse_ping_seconds: float = Field(15.0, gt=0, le=300)
    preview_url_ttl_seconds: int = Field(
        300, ge=10, le=3600, description="Lifetime of the signed URLs of live previews."
    )
    cleanup_interval_seconds: float = Field(
        60.0, ge=0, description="How often expired jobs are purged; 0 disables the sweeper."
    )
    max_request_bytes: int = Field(
        100 * 1024 * 1024,
        ge=1024,
        description="Largest request body of any route, whatever its inline images.",
    )
    max_json_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description=(
            "Largest body without inline images; each `data:` image earns the base64 size of "
            "max_image_bytes on top, up to the route's number of images."
        ),
    )
    max_sequence_frames: int = Field(
        120, ge=1, le=1000, description="Most condition frames a sequence may have."
    )
    max_sequence_bytes: int = Field(
        200 * 1024 * 1024,
        ge=1024,
        description="Most bytes of a sequence's frames (or its video) together, decoded.",
    )
    max_video_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description="Largest video a sequence may send."
    )
    max_video_seconds: float = Field(
        60.0, gt=0, description="Longest video a sequence may send, in seconds."
    )
    max_concurrent_large_uploads: int = Field(
        2,
        ge=1,
        description=(
            "Bodies past max_json_bytes read at once; others wait up to "
            "large_upload_wait_seconds for a turn, then get 503."
        ),
    )
    large_upload_wait_seconds: float = Field(10.0, ge=0, le=300)
    max_request_input_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description=(
            "Most bytes of one request's inputs together (uploads, data: URLs, fetched URLs and "
            "s3:// objects: images, masks, condition images, frames, videos); past it, 413."
        ),
    )
    max_inflight_input_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description=(
            "Most input bytes all requests in flight hold together in this process; past it, "
            "503 with Retry-After."
        ),
    )
    max_concurrent_fetches: int = Field(
        8, ge=1, description="Input URLs this process downloads at once; others wait their turn."
    )
    max_streams_per_tenant: int = Field(
        20, ge=1, description="Open Server-Sent Event streams per tenant before 429."
    )
    max_waits_per_tenant: int = Field(
        20, ge=1, description="Requests held by `Prefer: wait` per tenant before 429."
    )
    ops_token: SecretStr | None = Field(
        None,
        description=(
            "When set, /metrics, /docs, /redoc and /openapi.json need "
            "`Authorization: Bearer <token>`; unset, they are open."
        ),
    )

    @model_validator(mode="after")
    def _check_keys(self) -> GatewaySettings:
        production = self.environment == "production"
        if production and self.dev_api_key is not None:
            raise ValueError(
                "MASACTRL_DEV_API_KEY is for development only and is refused when "
                "MASACTRL_ENVIRONMENT=production; configure MASACTRL_API_KEYS (hashed keys)"
            )
        if not self.api_keys and self.dev_api_key is None:
            raise ValueError(
                "no API key is configured: set MASACTRL_API_KEYS (a JSON list of "
                '{"sha256", "tenant", "webhook_secret"}) or, in development, MASACTRL_DEV_API_KEY'
            )
        if self.dev_api_key is not None and not self.dev_api_key.get_secret_value().strip():
            raise ValueError("MASACTRL_DEV_API_KEY is empty")
        seen: set[str] = set()
        for entry in self.api_keys:
            if entry.sha256 in seen:
                raise ValueError(f"API key hash {entry.sha256[:12]}... is listed twice")
            seen.add(entry.sha256)
            for secret in (entry.webhook_secret, *entry.previous_webhook_secrets):
                try:
                    _check_webhook_secret(secret.get_secret_value(), production)
                except ValueError as exc:
                    raise ValueError(f"tenant {entry.tenant!r}: {exc}") from None
        if self.dev_webhook_secret is not None:
            _check_webhook_secret(self.dev_webhook_secret.get_secret_value(), production)
        return self

    def tenants_by_key_hash(self) -> dict[str, Tenant]:
        """SHA-256 hex of each accepted key -> its tenant."""
        table = {
            entry.sha256: Tenant(
                entry.tenant,
                tuple(
                    s.get_secret_value()
                    for s in (entry.webhook_secret, *entry.previous_webhook_secrets)
                ),
                entry.weight,
                entry.priorities,
            )
            for entry in self.api_keys
        }
        if self.dev_api_key is not None:
            key = self.dev_api_key.get_secret_value()
            digest = hashlib.sha256(key.encode()).hexdigest()
            if self.dev_webhook_secret is not None:
                secret = self.dev_webhook_secret.get_secret_value()
            else:
                # Derived so a developer's webhook receiver can verify without more setup.
                derived = hashlib.sha256(f"masactrl dev webhook:{key}".encode()).digest()
                secret = "whsec_" + base64.b64encode(derived).decode()
            table.setdefault(digest, Tenant(DEV_TENANT, (secret,)))
        return table
