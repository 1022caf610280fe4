"""docker-compose.yml and .env.example, checked as compose would read them (no Docker engine)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
import subprocess
from typing import Any

import pytest

from masactrl_jobs.catalog import load_catalog
from masactrl_jobs.settings import (
    CommonSettings,
    ConfigurationError,
    is_placeholder_secret,
)
from service.config import GatewaySettings
from tests.conftest import free_port, wait_for_port
from tests.deploy.manifests import (
    REPO,
    MissingVariable,
    all_references,
    interpolate,
    load_compose,
    parse_env_file,
    references,
    settings_from_environment,
    split_image,
)
from worker.config import WorkerSettings

BASE_SERVICES = {"redis", "minio", "minio-init", "gateway", "worker-sd15", "worker-webhooks"}
# The `ha` profile: a Redis replica and three Sentinels.
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
HA_SERVICES = {"redis-replica", *SENTINELS}
SERVICES = BASE_SERVICES | HA_SERVICES
APP_SERVICES = ("gateway", "worker-sd15", "worker-webhooks")
# The settings class each service's process builds from its environment.
SETTINGS: dict[str, type[CommonSettings]] = {
    "gateway": GatewaySettings,
    "worker-sd15": WorkerSettings,
    "worker-webhooks": WorkerSettings,
}
LONG_RUNNING = ("redis", "minio", *APP_SERVICES, *sorted(HA_SERVICES))
# Variables that hold credentials: each must be required (${VAR:?...}) with no default.
SECRET_VARIABLES = {
    "REDIS_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "MASACTRL_S3_ACCESS_KEY_ID",
    "MASACTRL_S3_SECRET_ACCESS_KEY",
    "MASACTRL_URL_SIGNING_SECRET",
    "MASACTRL_API_KEYS",
}
# The one optional credential: passed through, empty by default (anonymous Hub downloads).
OPTIONAL_SECRETS = {"HF_TOKEN"}
# Environment keys whose values are credentials (the Redis URL carries the password).
SECRET_NAME = re.compile(
    r"PASSWORD|SECRET|TOKEN|API_KEYS|ACCESS_KEY|ROOT_USER|REDISCLI_AUTH|REDIS_URL"
)
HF_HOME = "/var/cache/huggingface"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(REPO / ".env.example")


def real_secrets() -> dict[str, str]:
    """What an operator following .env.example would set (hex: safe inside the Redis URL)."""
    values = {name: secrets.token_hex(32) for name in SECRET_VARIABLES}
    values["MASACTRL_S3_ACCESS_KEY_ID"] = "masactrl" + secrets.token_hex(6)
    key_hash = hashlib.sha256(secrets.token_urlsafe(32).encode()).hexdigest()
    webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    values["MASACTRL_API_KEYS"] = json.dumps(
        [{"sha256": key_hash, "tenant": "acme", "webhook_secret": webhook_secret}]
    )
    return values


def rendered(env: dict[str, str]) -> dict[str, Any]:
    return interpolate(load_compose(), env)


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == SERVICES
    volumes = {"redis-data", "redis-replica-data", "minio-data", "model-cache"}
    assert set(compose["volumes"]) == volumes
    # Only the `ha` services are in a profile: a plain `docker compose up` runs what it did.
    profiled = {name for name, spec in compose["services"].items() if "profiles" in spec}
    assert profiled == HA_SERVICES
    assert all(compose["services"][name]["profiles"] == ["ha"] for name in HA_SERVICES)


def test_redis_persists_with_aof_and_has_a_healthcheck(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"  # the image's entrypoint drops root only for this
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert command[command.index("--requirepass") + 1] == "${REDIS_PASSWORD:?Variable not set}"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # redis-cli authenticates from REDISCLI_AUTH, with the same password the server requires.
    assert redis["environment"]["REDISCLI_AUTH"] == "${REDIS_PASSWORD:?Variable not set}"
    assert "redis-data:/data" in redis["volumes"]
    assert "ports" not in redis  # only the services on the compose network reach it


def redis_option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_redis_memory_is_capped_and_never_evicts(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    # Eviction would drop job records, leases or queue messages without a trace.
    assert redis_option(command, "--maxmemory-policy") == "noeviction"
    assert redis_option(command, "--maxmemory") == "${REDIS_MAXMEMORY:-1gb}"
    rendered_command = rendered(real_secrets())["services"]["redis"]["command"]
    assert re.fullmatch(r"\d+(mb|gb)", redis_option(rendered_command, "--maxmemory"))


def test_a_full_redis_refuses_writes_and_keeps_every_key(compose: dict[str, Any]) -> None:
    """The compose policy on a real redis-server with a tiny ceiling: writes fail loudly (the
    error the gateway and workers see), nothing already stored disappears, reads go on."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing: `make test` installs it (Debian: redis-server)")
    import redis

    policy = redis_option(compose["services"]["redis"]["command"], "--maxmemory-policy")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--maxmemory", "4mb", "--maxmemory-policy", policy],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        client = redis.Redis(port=port)
        written = 0
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for written in range(10_000):  # 10,000 x 8 KiB is far above 4 MB
                client.set(f"job:{written}", b"x" * 8192)
        assert written > 0
        assert client.dbsize() == written  # every key that was accepted is still there
        assert client.get("job:0") == b"x" * 8192
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.hset("job:new", "status", "queued")
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_minio_healthcheck_and_one_shot_bucket_init(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert "minio-data:/data" in services["minio"]["volumes"]
    init = services["minio-init"]
    assert init["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert init["restart"] == "no"
    script = init["command"][0]
    assert 'mc mb --ignore-existing "local/$$S3_BUCKET"' in script
    assert "mc admin user add" in script and "set -eu" in script
    # The service's own account: its keys are the ones the app services get.
    assert (
        init["environment"]["SERVICE_ACCESS_KEY"]
        == "${MASACTRL_S3_ACCESS_KEY_ID:?Variable not set}"
    )
    assert init["environment"]["SERVICE_SECRET_KEY"] == (
        "${MASACTRL_S3_SECRET_ACCESS_KEY:?Variable not set}"
    )


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_wait_for_healthy_dependencies(compose: dict[str, Any], service: str) -> None:
    assert compose["services"][service]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "minio": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
    }


def test_every_depends_on_names_a_condition(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in SERVICES, (name, dependency)
            assert spec["condition"] in {"service_healthy", "service_completed_successfully"}
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in compose["services"][dependency], dependency


# Where each service must write despite its read-only root (volumes aside).
TMPFS = {
    "redis": set(),
    "redis-replica": set(),
    **{name: {"/tmp"} for name in SENTINELS},  # Sentinel rewrites its configuration file
    "minio": {"/tmp", "/root/.minio"},
    "minio-init": {"/tmp", "/root/.mc"},
    "gateway": {"/tmp"},
    "worker-sd15": {"/tmp", "/home/masactrl"},
    "worker-webhooks": {"/tmp"},
}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_service_has_a_read_only_root(compose: dict[str, Any], service: str) -> None:
    spec = compose["services"][service]
    assert spec["read_only"] is True
    assert set(spec.get("tmpfs", [])) == TMPFS[service]


def test_gateway(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert gateway["build"] == {"context": ".", "dockerfile": "docker/gateway.Dockerfile"}
    assert gateway["command"] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert gateway["ports"] == ["${GATEWAY_PORT:-8000}:8000"]
    probe = gateway["healthcheck"]["test"]
    assert probe[:3] == ["CMD", "python", "-c"]
    assert "http://127.0.0.1:8000/readyz" in probe[3]
    assert gateway["read_only"] is True and gateway["cap_drop"] == ["ALL"]
    assert gateway["stop_grace_period"] == "40s"  # above uvicorn's 30 s graceful shutdown


def test_gpu_worker(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker-sd15"]
    assert worker["build"] == {"context": ".", "dockerfile": "docker/worker.Dockerfile"}
    assert worker["command"] == ["worker", "--model", "sd15"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "capabilities": ["gpu"], "count": 1}
    ]
    assert worker["environment"]["HF_HOME"] == HF_HOME
    assert f"model-cache:{HF_HOME}" in worker["volumes"]
    assert worker["environment"]["HF_TOKEN"] == "${HF_TOKEN:-}"
    # Long enough for Celery's warm shutdown to finish the running job.
    assert worker["stop_grace_period"] == "15m"


def test_only_the_gpu_worker_reserves_a_gpu(compose: dict[str, Any]) -> None:
    reserving = [name for name, service in compose["services"].items() if "deploy" in service]
    assert reserving == ["worker-sd15"]


def test_webhook_worker_runs_on_the_gateway_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    webhooks = services["worker-webhooks"]
    assert webhooks["command"] == ["worker", "--webhooks"]
    assert webhooks["image"] == services["gateway"]["image"]
    assert webhooks["build"] == services["gateway"]["build"]


@pytest.mark.parametrize("service", LONG_RUNNING)
def test_long_running_services_restart(compose: dict[str, Any], service: str) -> None:
    assert compose["services"][service]["restart"] == "unless-stopped"


def test_tenants_reach_only_the_gateway(compose: dict[str, Any]) -> None:
    having = {
        name
        for name, service in compose["services"].items()
        if "MASACTRL_API_KEYS" in service.get("environment", {})
    }
    assert having == {"gateway"}


def test_secret_environment_values_are_required_references(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if not SECRET_NAME.search(key):
                continue
            refs = references(str(value))
            assert refs, f"{name}.{key} is a literal"
            for ref in refs:
                if ref.name in OPTIONAL_SECRETS:
                    assert ref.text == "${HF_TOKEN:-}", (name, key)
                else:
                    assert ref.name in SECRET_VARIABLES, (name, key, ref.name)
                    assert ref.operator == ":?", (name, key, ref.text)
            checked += 1
    # 3 app services x 5 shared (Redis URL, sentinel password, S3 key pair, signing secret), the
    # gateway's API keys, HF_TOKEN, REDISCLI_AUTH of the 5 Redis nodes (primary, replica,
    # sentinels), the sentinels' password, MinIO's root pair, minio-init's root pair and service
    # key pair.
    assert checked == 3 * 5 + 1 + 1 + 5 + 3 + 2 + 4


def test_no_secret_variable_has_a_default_anywhere(compose: dict[str, Any]) -> None:
    refs = all_references(compose)
    used = {ref.name for ref in refs}
    assert used >= SECRET_VARIABLES
    for ref in refs:
        if ref.name in SECRET_VARIABLES:
            assert ref.operator == ":?" and ref.argument == "Variable not set", ref.text


@pytest.mark.parametrize("missing", sorted(SECRET_VARIABLES))
def test_compose_refuses_to_render_without_each_secret(missing: str) -> None:
    env = real_secrets()
    rendered(env)  # complete: renders
    for value in ("", None):
        partial = dict(env)
        if value is None:
            del partial[missing]
        else:
            partial[missing] = value
        with pytest.raises(MissingVariable) as error:
            rendered(partial)
        assert error.value.name == missing


def test_no_literal_credentials_in_the_file() -> None:
    lines = (REPO / "docker-compose.yml").read_text().lower().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    for default in ("minioadmin", "change-me", "changeme", "password123", "whsec_"):
        assert default not in text
    # After interpolation with sentinels, every secret-looking value came from the environment.
    env = {name: f"sentinel-{name.lower()}" for name in SECRET_VARIABLES | OPTIONAL_SECRETS}
    for name, service in rendered(env)["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert "sentinel-" in value, (name, key, value)


def test_env_example_documents_exactly_what_compose_uses(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    used = {ref.name for ref in all_references(compose)}
    assert used == set(env_example)


def test_env_example_placeholders_are_refused(
    env_example: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in SECRET_VARIABLES:
        value = env_example[name]
        assert "change-me" in value, name
        if name != "MASACTRL_API_KEYS":
            assert is_placeholder_secret(value), name
    assert env_example["HF_TOKEN"] == ""
    # Started as is, the gateway refuses the placeholders: first the tenant list...
    gateway_env = rendered(env_example)["services"]["gateway"]["environment"]
    with pytest.raises(ConfigurationError, match=r"MASACTRL_API_KEYS\[0\]\[sha256\]"):
        settings_from_environment(GatewaySettings, gateway_env, monkeypatch)
    # ...then, with real tenants, the signing secret.
    gateway_env["MASACTRL_API_KEYS"] = real_secrets()["MASACTRL_API_KEYS"]
    with pytest.raises(ConfigurationError, match="MASACTRL_URL_SIGNING_SECRET looks like a"):
        settings_from_environment(GatewaySettings, gateway_env, monkeypatch)
    # The workers refuse it too.
    worker_env = rendered(env_example)["services"]["worker-sd15"]["environment"]
    with pytest.raises(ConfigurationError, match="MASACTRL_URL_SIGNING_SECRET looks like a"):
        settings_from_environment(WorkerSettings, worker_env, monkeypatch)


@pytest.mark.parametrize("service", APP_SERVICES)
def test_compose_environment_is_a_valid_production_configuration(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = real_secrets()
    environment = rendered(env)["services"][service]["environment"]
    settings = settings_from_environment(SETTINGS[service], environment, monkeypatch)
    assert settings.environment == "production"
    assert settings.redis_url == f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0"
    assert settings.storage_url == "s3://masactrl"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.s3_public_endpoint_url == "http://localhost:9000"
    assert settings.s3_access_key_id == env["MASACTRL_S3_ACCESS_KEY_ID"]
    assert settings.signing_key == env["MASACTRL_URL_SIGNING_SECRET"].encode()
    assert load_catalog(settings).default == "sd15"
    if service == "gateway":
        assert settings.max_queue_depth == 100
        assert [t.name for t in settings.tenants_by_key_hash().values()] == ["acme"]


def test_gpu_worker_outlives_its_longest_job_on_stop(compose: dict[str, Any]) -> None:
    grace = compose["services"]["worker-sd15"]["stop_grace_period"]
    seconds = int(grace.removesuffix("m")) * 60
    assert seconds > WorkerSettings.model_fields["time_limit_seconds"].default


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_images_are_pinned(compose: dict[str, Any], service: str) -> None:
    image = rendered(real_secrets())["services"][service]["image"]
    name, tag, digest = split_image(image)
    assert tag and tag != "latest", image
    if "build" not in compose["services"][service]:
        # Third-party images: an exact release, not a moving major/minor tag.
        assert digest or re.search(r"\d+\.\d+\.\d+|RELEASE\.\d{4}-\d\d-\d\dT", tag), image


def sentinel_config(compose: dict[str, Any], name: str) -> list[list[str]]:
    """The configuration lines a sentinel's start-up script writes, split into words."""
    script = compose["services"][name]["command"][0]
    body = script.split("<<EOF\n", 1)[1].split("\nEOF", 1)[0]
    return [line.split() for line in body.splitlines()]


def test_ha_profile_a_replica_and_three_sentinels_watch_the_primary(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    replica = services["redis-replica"]["command"]
    assert redis_option(replica, "--replicaof") == "redis"
    assert replica[replica.index("--replicaof") + 2] == "6379"
    # The replica may become the master: the primary's persistence and memory policy, and both
    # nodes authenticate to whichever is master.
    primary = services["redis"]["command"]
    for option in ("--appendonly", "--appendfsync", "--maxmemory", "--maxmemory-policy"):
        assert redis_option(replica, option) == redis_option(primary, option), option
    for command in (primary, replica):
        assert redis_option(command, "--masterauth") == "${REDIS_PASSWORD:?Variable not set}"
    for name in SENTINELS:
        config = sentinel_config(compose, name)
        monitor = next(line for line in config if line[:2] == ["sentinel", "monitor"])
        assert monitor[2:] == ["masactrl", "redis", "6379", "2"]  # quorum 2 of 3
        assert ["sentinel", "auth-pass", "masactrl", "$$REDIS_PASSWORD"] in config
        assert ["requirepass", "$$REDIS_PASSWORD"] in config
        assert services[name]["command"][0].rstrip().endswith("--sentinel")


@pytest.mark.parametrize("service", APP_SERVICES)
def test_ha_profile_points_every_process_at_the_sentinels(
    service: str, env_example: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The values .env.example gives for the profile, in its comments.
    text = (REPO / ".env.example").read_text()
    sentinels = re.search(r"#\s+MASACTRL_REDIS_SENTINELS=(\S+)", text)
    master = re.search(r"#\s+MASACTRL_REDIS_SENTINEL_MASTER=(\S+)", text)
    assert sentinels and master
    env = {**real_secrets(), "MASACTRL_REDIS_SENTINELS": sentinels[1]}
    env["MASACTRL_REDIS_SENTINEL_MASTER"] = master[1]
    environment = rendered(env)["services"][service]["environment"]
    target = settings_from_environment(SETTINGS[service], environment, monkeypatch).redis_target
    assert target.sentinels == tuple((name, 26379) for name in SENTINELS)
    compose = load_compose()
    assert target.sentinel_master == sentinel_config(compose, SENTINELS[0])[3][2] == "masactrl"
    assert target.sentinel_password == env["REDIS_PASSWORD"]
    assert target.wait_replicas == 1
    # Without the profile's values, the URL's Redis and no waiting for a replica.
    environment = rendered(real_secrets())["services"][service]["environment"]
    plain = settings_from_environment(SETTINGS[service], environment, monkeypatch).redis_target
    assert plain.sentinels == () and plain.wait_replicas == 0
