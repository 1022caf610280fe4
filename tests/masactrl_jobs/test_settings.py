"""Shared settings: environment variables, production safety rules, readable errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from masactrl_jobs.settings import (
    CommonSettings,
    ConfigurationError,
    is_placeholder_secret,
    load_settings,
)

GOOD_SECRET = "q9VZ3c1mT0k8rX2pL5sW7yB4nD6fH0jA"


def production(**overrides: object) -> CommonSettings:
    return load_settings(CommonSettings, _env_file=None, **overrides)


def development(**overrides: object) -> CommonSettings:
    return load_settings(CommonSettings, _env_file=None, environment="development", **overrides)


def test_defaults(tmp_path: Path) -> None:
    settings = production(url_signing_secret=GOOD_SECRET)
    assert settings.environment == "production"
    assert settings.is_production
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    # The default file storage is absolute, under the working directory.
    assert settings.storage_url == (tmp_path / "var" / "storage").resolve().as_uri()
    assert settings.public_base_url == "http://127.0.0.1:8000"
    assert settings.presigned_url_ttl_seconds == 3600
    assert settings.job_retention_seconds == 7 * 24 * 3600
    assert settings.max_image_bytes == 20 * 1024 * 1024
    assert settings.max_image_side == 4096
    assert settings.allow_loopback_http is False


def test_reads_masactrl_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASACTRL_ENVIRONMENT", "development")
    monkeypatch.setenv("MASACTRL_REDIS_URL", "redis://cache:6379/2")
    monkeypatch.setenv("MASACTRL_STORAGE_URL", "s3://bucket/some/prefix")
    monkeypatch.setenv("MASACTRL_S3_SECRET_ACCESS_KEY", "s3-secret")
    monkeypatch.setenv("MASACTRL_ALLOW_LOOPBACK_HTTP", "true")
    monkeypatch.setenv("MASACTRL_MAX_IMAGE_SIDE", "2048")
    settings = load_settings(CommonSettings, _env_file=None)
    assert settings.redis_url == "redis://cache:6379/2"
    assert settings.storage_url == "s3://bucket/some/prefix"
    assert settings.s3_secret_access_key is not None
    assert settings.s3_secret_access_key.get_secret_value() == "s3-secret"
    assert "s3-secret" not in repr(settings)  # secrets never show in logs
    assert settings.allow_loopback_http is True
    assert settings.max_image_side == 2048


def test_reads_a_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"MASACTRL_URL_SIGNING_SECRET={GOOD_SECRET}\nMASACTRL_REDIS_URL=redis://fromfile:1/0\n"
    )
    settings = load_settings(CommonSettings)  # the working directory is tmp_path
    assert settings.redis_url == "redis://fromfile:1/0"


def test_subclasses_share_the_prefix_and_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    class GatewayLike(CommonSettings):
        port: int = 8000

    monkeypatch.setenv("MASACTRL_PORT", "9000")
    monkeypatch.setenv("MASACTRL_URL_SIGNING_SECRET", GOOD_SECRET)
    settings = load_settings(GatewayLike, _env_file=None)
    assert settings.port == 9000
    with pytest.raises(ConfigurationError, match="MASACTRL_PORT"):
        load_settings(GatewayLike, _env_file=None, port="not a port")


@pytest.mark.parametrize(
    "secret",
    [
        None,
        "",
        "changethis",
        "changeme",
        "secret",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "short-but-random-8f3k",
    ],
)
def test_production_refuses_missing_or_placeholder_signing_secrets(secret: str | None) -> None:
    overrides = {} if secret is None else {"url_signing_secret": secret}
    with pytest.raises(ConfigurationError, match="MASACTRL_URL_SIGNING_SECRET"):
        production(**overrides)


def test_production_accepts_a_real_secret() -> None:
    settings = production(url_signing_secret=GOOD_SECRET)
    assert settings.signing_key == GOOD_SECRET.encode()


def test_development_derives_a_shared_secret_when_none_is_set(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING"):
        first = development()
    assert "development secret" in caplog.text  # said once, when the process loads its settings
    second = development()
    # Derived on use, never written into the settings: validation has no side effects.
    assert first.url_signing_secret is None
    # Two processes (gateway and worker) with the same configuration agree without coordination.
    assert first.signing_key == second.signing_key
    assert len(first.signing_key) >= 32
    other = development(storage_url="file:///elsewhere")
    assert other.signing_key != first.signing_key


def test_development_tolerates_a_placeholder_secret() -> None:
    assert development(url_signing_secret="changethis").signing_key == b"changethis"


def test_loopback_http_is_refused_in_production() -> None:
    with pytest.raises(ConfigurationError, match="MASACTRL_ALLOW_LOOPBACK_HTTP"):
        production(url_signing_secret=GOOD_SECRET, allow_loopback_http=True)
    assert development(allow_loopback_http=True).allow_loopback_http


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://var/storage", "three slashes"),
        ("file:relative", "three slashes"),
        ("s3://", "names no bucket"),
        ("s3://bucket/prefix?x=1", "query"),
        ("http://minio:9000/bucket", "not supported"),
        ("/var/storage", "not supported"),
    ],
)
def test_storage_url_errors_are_sentences(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        development(storage_url=url)
    text = str(caught.value)
    assert text.startswith("invalid configuration:")
    assert "MASACTRL_STORAGE_URL:" in text
    assert message in text


@pytest.mark.parametrize(
    "url", ["file:///srv/masactrl", "file://localhost/srv/x", "s3://b", "s3://b/p/q"]
)
def test_storage_url_accepts(url: str) -> None:
    assert development(storage_url=url).storage_url == url


def test_public_base_url_is_normalised_and_checked() -> None:
    assert development(public_base_url="https://api.example/").public_base_url == (
        "https://api.example"
    )
    with pytest.raises(ConfigurationError, match="MASACTRL_PUBLIC_BASE_URL"):
        development(public_base_url="api.example")
    assert development(s3_endpoint_url="").s3_endpoint_url is None


def test_several_problems_are_listed_one_per_line() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(
            CommonSettings,
            _env_file=None,
            presigned_url_ttl_seconds=0,
            max_image_side="big",
            environment="staging",
        )
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid configuration:"
    assert {line.strip().split(":")[0] for line in lines[1:]} == {
        "MASACTRL_PRESIGNED_URL_TTL_SECONDS",
        "MASACTRL_MAX_IMAGE_SIDE",
        "MASACTRL_ENVIRONMENT",
    }


def test_plain_construction_still_raises_validation_error() -> None:
    with pytest.raises(ValidationError):
        CommonSettings(_env_file=None)


def test_catalog_sources(tmp_path: Path) -> None:
    inline = {"default": "tiny", "models": [{"name": "tiny", "source": "/m/tiny", "family": "sd"}]}
    assert development(catalog=json.dumps(inline)).catalog == json.dumps(inline)
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(inline))
    assert development(catalog_file=str(path)).catalog_file == path
    with pytest.raises(ConfigurationError, match="not both"):
        development(catalog=json.dumps(inline), catalog_file=str(path))
    # Settings only say where the catalog is; reading it is load_catalog's job, at start-up.
    missing = development(catalog_file=str(tmp_path / "missing.json"))
    assert missing.catalog_file == tmp_path / "missing.json"


def test_placeholder_detection() -> None:
    assert is_placeholder_secret("changethis")
    assert is_placeholder_secret("  ")
    assert is_placeholder_secret("<your secret here>")
    assert not is_placeholder_secret(GOOD_SECRET)


def test_sentinels_need_a_master_name_and_the_other_way_round() -> None:
    with pytest.raises(ConfigurationError) as raised:
        development(redis_sentinels="10.0.0.1:26379")
    assert "MASACTRL_REDIS_SENTINELS is set but MASACTRL_REDIS_SENTINEL_MASTER is not" in str(
        raised.value
    )
    with pytest.raises(ConfigurationError) as raised:
        development(redis_sentinel_master="masactrl")
    assert "MASACTRL_REDIS_SENTINEL_MASTER is set but MASACTRL_REDIS_SENTINELS is not" in str(
        raised.value
    )


@pytest.mark.parametrize("sentinels", ["sentinel-0", "sentinel-0:port", "a:1,:26379", "a:70000"])
def test_a_malformed_sentinel_address_is_named(sentinels: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        development(redis_sentinels=sentinels, redis_sentinel_master="masactrl")
    assert "MASACTRL_REDIS_SENTINELS: " in str(raised.value)
    assert "is not host:port" in str(raised.value)


def test_sentinels_make_a_redis_target_with_the_url_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MASACTRL_REDIS_URL", "redis://:pw@ignored:6379/3")
    monkeypatch.setenv("MASACTRL_REDIS_SENTINELS", " s0:26379, s1:26380 ,")
    monkeypatch.setenv("MASACTRL_REDIS_SENTINEL_MASTER", "masactrl")
    settings = development()
    assert settings.redis_sentinels == "s0:26379,s1:26380"
    target = settings.redis_target
    assert target.sentinels == (("s0", 26379), ("s1", 26380))
    assert target.sentinel_master == "masactrl"
    assert target.wait_replicas == 1
    assert target.master_options() == {"password": "pw", "db": 3}
    # Without sentinels there is no replica to wait for.
    monkeypatch.delenv("MASACTRL_REDIS_SENTINELS")
    monkeypatch.delenv("MASACTRL_REDIS_SENTINEL_MASTER")
    assert development().redis_target.wait_replicas == 0


def test_the_redis_settings_are_documented() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    redis_fields = [name for name in CommonSettings.model_fields if name.startswith("redis_")]
    assert len(redis_fields) == 6
    missing = [name for name in redis_fields if f"`MASACTRL_{name.upper()}`" not in text]
    assert not missing
