"""Kubernetes manifests: render base and each overlay, then check what must hold in all of them."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from masactrl_jobs.catalog import load_catalog, parse_catalog
from masactrl_jobs.queue import WEBHOOK_QUEUE, queue_name
from service.config import GatewaySettings
from tests.deploy.manifests import (
    DEPLOY,
    REPO,
    Endpoint,
    by_kind,
    connection_allowed,
    containers_of,
    kustomize,
    label_selector_matches,
    one,
    settings_from_environment,
    split_image,
)
from worker.config import WorkerSettings

TARGETS = ["base", "overlays/dev", "overlays/prod"]
SECRET = "masactrl-secrets"
CONFIG = "masactrl-config"
CATALOG = "masactrl-catalog"
APP_UID = 10001
HF_HOME = "/var/cache/huggingface"
GATEWAY_LABELS = {"app.kubernetes.io/name": "masactrl", "app.kubernetes.io/component": "gateway"}
# Settings every MasaCtrl process needs to reach Redis, storage and the catalog in production.
SHARED_SETTINGS = {
    "MASACTRL_ENVIRONMENT",
    "MASACTRL_REDIS_URL",
    "MASACTRL_STORAGE_URL",
    "MASACTRL_S3_ACCESS_KEY_ID",
    "MASACTRL_S3_SECRET_ACCESS_KEY",
    "MASACTRL_S3_REGION",
    "MASACTRL_URL_SIGNING_SECRET",
    "MASACTRL_PUBLIC_BASE_URL",
    "MASACTRL_CATALOG_FILE",
}
SECRET_LOOKING = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEYS|ACCESS_KEY|REDIS_URL")


@pytest.fixture(scope="module", params=TARGETS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return kustomize(DEPLOY / request.param)


def render(target: str) -> list[dict[str, Any]]:
    return kustomize(DEPLOY / target)


def secret_example() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "secret.example.yaml").read_text())


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def workers(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """GPU worker Deployments by the model they serve."""
    found = {}
    for deployment in by_kind(resources, "Deployment"):
        labels = deployment["metadata"]["labels"]
        if labels.get("app.kubernetes.io/component") == "worker":
            found[labels["masactrl.io/model"]] = deployment
    return found


def config_data(resources: list[dict[str, Any]], name: str) -> dict[str, str]:
    return one(resources, "ConfigMap", name)["data"]


def effective_env(resources: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """Variable name -> where it comes from ('value', ('secret', key), ('config', name, key))."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, "secrets only through secretKeyRef, by key"
        name = source["configMapRef"]["name"]
        for key in config_data(resources, name):
            env[key] = ("config", name, key)
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = "value"
        elif "secretKeyRef" in entry["valueFrom"]:
            env[entry["name"]] = ("secret", entry["valueFrom"]["secretKeyRef"]["key"])
        else:
            ref = entry["valueFrom"]["configMapKeyRef"]
            env[entry["name"]] = ("config", ref["name"], ref["key"])
    return env


# --- secrets and configuration ----------------------------------------------------------------


def test_no_secret_is_rendered(rendered: list[dict[str, Any]]) -> None:
    assert by_kind(rendered, "Secret") == []
    for resource in rendered:
        for container in containers_of(resource):
            for entry in container.get("env", []):
                if SECRET_LOOKING.search(entry["name"]):
                    assert "value" not in entry, (resource["metadata"]["name"], entry["name"])
    for configmap in by_kind(rendered, "ConfigMap"):
        leaked = [key for key in configmap["data"] if SECRET_LOOKING.search(key)]
        assert leaked == [], configmap["metadata"]["name"]


def test_secret_example_is_outside_every_kustomization() -> None:
    kustomizations = list(DEPLOY.rglob("kustomization.yaml"))
    assert len(kustomizations) == 3
    for path in kustomizations:
        spec = yaml.safe_load(path.read_text())
        assert "secretGenerator" not in spec, path
        entries = spec.get("resources", []) + [p["path"] for p in spec.get("patches", [])]
        assert entries and not any("secret" in entry for entry in entries), path
    example = secret_example()
    assert example["kind"] == "Secret" and example["metadata"]["name"] == SECRET
    assert all("change-me" in value for value in example["stringData"].values())


def test_every_secret_reference_names_a_documented_key(rendered: list[dict[str, Any]]) -> None:
    keys = set(secret_example()["stringData"])
    used = set()
    for resource in rendered:
        for container in containers_of(resource):
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET and ref["key"] in keys, entry
                    # Only the Hub token and the sentinels' password may be absent.
                    optional = ref["key"] in {"HF_TOKEN", "MASACTRL_REDIS_SENTINEL_PASSWORD"}
                    assert ref.get("optional", False) == optional, entry
                    used.add(ref["key"])
    for auth in by_kind(rendered, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == SECRET and ref["key"] in keys
            used.add(ref["key"])
    for monitor in by_kind(rendered, "ServiceMonitor"):
        for endpoint in monitor["spec"]["endpoints"]:
            ref = endpoint["authorization"]["credentials"]
            assert ref["name"] == SECRET and ref["key"] in keys
    assert used == keys  # and the example documents no key nothing reads


def test_every_config_and_volume_reference_resolves(rendered: list[dict[str, Any]]) -> None:
    configmaps = {c["metadata"]["name"] for c in by_kind(rendered, "ConfigMap")}
    claims = {c["metadata"]["name"] for c in by_kind(rendered, "PersistentVolumeClaim")}
    accounts = {a["metadata"]["name"] for a in by_kind(rendered, "ServiceAccount")}
    for deployment in by_kind(rendered, "Deployment"):
        spec = pod_spec(deployment)
        assert spec["serviceAccountName"] in accounts
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        for container in spec["containers"]:
            env = effective_env(rendered, container)  # raises on a missing ConfigMap
            for source in env.values():
                if source != "value" and source[0] == "config":
                    assert source[2] in config_data(rendered, source[1])
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, mount


def test_every_process_gets_the_shared_settings(rendered: list[dict[str, Any]]) -> None:
    deployments = by_kind(rendered, "Deployment")
    assert len(deployments) == 3
    for deployment in deployments:
        (container,) = pod_spec(deployment)["containers"]
        env = effective_env(rendered, container)
        assert set(env) >= SHARED_SETTINGS, deployment["metadata"]["name"]
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        # Tenants (key hashes, webhook secrets) only where they are used.
        # (the gateway stores a tenant's webhook secret with each job it accepts).
        assert ("MASACTRL_API_KEYS" in env) == (component == "gateway")


def test_catalog_lists_exactly_the_served_models(rendered: list[dict[str, Any]]) -> None:
    data = config_data(rendered, CATALOG)
    catalog = parse_catalog(data["catalog.json"], origin="catalog ConfigMap")
    assert set(catalog.names()) == set(workers(rendered)) == {"sd15"}
    assert catalog.default == "sd15"


def test_catalog_file_is_mounted_where_the_setting_points(rendered: list[dict[str, Any]]) -> None:
    path = PurePosixPath(config_data(rendered, CONFIG)["MASACTRL_CATALOG_FILE"])
    assert path.name in config_data(rendered, CATALOG)
    for deployment in by_kind(rendered, "Deployment"):
        spec = pod_spec(deployment)
        catalog_volumes = {
            v["name"] for v in spec["volumes"] if v.get("configMap", {}).get("name") == CATALOG
        }
        (container,) = spec["containers"]
        mounts = [m for m in container["volumeMounts"] if m["name"] in catalog_volumes]
        assert [m["mountPath"] for m in mounts] == [str(path.parent)], deployment["metadata"]
        assert mounts[0]["readOnly"] is True


# What an operator puts in the Secret (the shape secret.example.yaml asks for).
REAL_SECRETS = {
    "MASACTRL_REDIS_URL": "redis://:5d1c0e8f9a7b@redis:6379/0",
    "MASACTRL_S3_ACCESS_KEY_ID": "AKIAEXAMPLE7Q2W",
    "MASACTRL_S3_SECRET_ACCESS_KEY": "9bq3Zr6Lw0Yx8Vt2Ns4Pm1Kj7Hg5Fd",
    "MASACTRL_URL_SIGNING_SECRET": "Qm8r2Tz5Xw1Lp9Vk4Jd7Hs0Fc3Ng6Yb-e_Ua",
    "MASACTRL_API_KEYS": json.dumps(
        [
            {
                "sha256": "4f" * 32,
                "tenant": "acme",
                "webhook_secret": "whsec_" + base64.b64encode(bytes(range(7, 39))).decode(),
            }
        ]
    ),
}
SETTINGS = {"gateway": GatewaySettings, "worker": WorkerSettings, "webhooks": WorkerSettings}


def test_each_process_builds_valid_production_settings(
    rendered: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap values plus a filled-in Secret are what each process starts with."""
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_text(config_data(rendered, CATALOG)["catalog.json"])
    for deployment in by_kind(rendered, "Deployment"):
        (container,) = pod_spec(deployment)["containers"]
        values = {}
        for name, source in effective_env(rendered, container).items():
            if source == "value":
                values[name] = next(e["value"] for e in container["env"] if e["name"] == name)
            elif source[0] == "config":
                values[name] = config_data(rendered, source[1])[source[2]]
            elif source[1] in REAL_SECRETS:
                values[name] = REAL_SECRETS[source[1]]
        values["MASACTRL_CATALOG_FILE"] = str(catalog_file)
        component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        settings = settings_from_environment(SETTINGS[component], values, monkeypatch)
        assert settings.environment == "production"
        assert settings.storage_url.startswith("s3://")
        assert settings.public_base_url.startswith("https://")
        assert load_catalog(settings).names() == ["sd15"]


def test_worker_grace_period_outlasts_a_job(rendered: list[dict[str, Any]]) -> None:
    hard_limit = WorkerSettings.model_fields["time_limit_seconds"].default
    for deployment in workers(rendered).values():
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] > hard_limit


# --- gateway ------------------------------------------------------------------------------------


def gateway(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    return one(rendered, "Deployment", "masactrl-gateway")


def test_gateway_probes(rendered: list[dict[str, Any]]) -> None:
    (container,) = pod_spec(gateway(rendered))["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["args"] == [
        *("serve", "--host", "0.0.0.0", "--port", "8000"),
        *("--graceful-timeout", "60"),
    ]
    # The pod outlives uvicorn's graceful shutdown.
    assert pod_spec(gateway(rendered))["terminationGracePeriodSeconds"] > 60
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # Liveness must not depend on Redis: an outage would restart every gateway at once.
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}


@pytest.mark.parametrize(
    "name", ["masactrl-gateway", "masactrl-worker-sd15", "masactrl-worker-webhooks"]
)
def test_pods_are_locked_down(rendered: list[dict[str, Any]], name: str) -> None:
    deployment = one(rendered, "Deployment", name)
    spec = pod_spec(deployment)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == APP_UID  # the images' USER
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = spec["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    # With a read-only root, /tmp must be a volume.
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


def test_service_and_servicemonitor(rendered: list[dict[str, Any]]) -> None:
    service = one(rendered, "Service", "masactrl-gateway")
    assert service["spec"]["selector"] == GATEWAY_LABELS
    assert selects(service["spec"]["selector"], pod_labels(gateway(rendered)))
    for other in workers(rendered).values():
        assert not selects(service["spec"]["selector"], pod_labels(other))
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    monitor = one(rendered, "ServiceMonitor", "masactrl-gateway")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    # The scrape carries the token the gateway requires on /metrics.
    credentials = endpoint["authorization"]["credentials"]
    assert endpoint["authorization"]["type"] == "Bearer"
    assert credentials["key"] == "MASACTRL_OPS_TOKEN"
    gateway_env = effective_env(rendered, pod_spec(gateway(rendered))["containers"][0])
    assert gateway_env["MASACTRL_OPS_TOKEN"] == ("secret", "MASACTRL_OPS_TOKEN")


def test_hpa_and_pdb_target_the_gateway(rendered: list[dict[str, Any]]) -> None:
    (hpa,) = by_kind(rendered, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "masactrl-gateway",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (pdb,) = by_kind(rendered, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels(gateway(rendered)))
    for deployment in by_kind(rendered, "Deployment"):
        if deployment["metadata"]["name"] != "masactrl-gateway":
            assert not selects(selector, pod_labels(deployment))
    # A PDB at least as large as the smallest gateway fleet would block every node drain.
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    else:
        assert pdb["spec"]["maxUnavailable"] >= 1


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(
    rendered: list[dict[str, Any]],
) -> None:
    targets = {
        h["spec"]["scaleTargetRef"]["name"] for h in by_kind(rendered, "HorizontalPodAutoscaler")
    }
    targets |= {s["spec"]["scaleTargetRef"]["name"] for s in by_kind(rendered, "ScaledObject")}
    assert targets == {"masactrl-gateway", "masactrl-worker-sd15"}
    for name in targets:
        assert "replicas" not in one(rendered, "Deployment", name)["spec"], name


# --- GPU workers and KEDA -------------------------------------------------------------------


def test_gpu_workers(rendered: list[dict[str, Any]]) -> None:
    assert set(workers(rendered)) == {"sd15"}
    for model, deployment in workers(rendered).items():
        spec = pod_spec(deployment)
        (container,) = spec["containers"]
        assert container["args"] == ["worker", "--model", model]
        assert split_image(container["image"])[0].endswith("worker")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
        # Long enough for Celery's warm shutdown to finish a job on scale-in or rollout.
        assert spec["terminationGracePeriodSeconds"] >= 600
        # A surge pod would wait for a GPU the old pods hold.
        assert deployment["spec"]["strategy"]["rollingUpdate"] == {
            "maxSurge": 0,
            "maxUnavailable": 1,
        }
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_HOME"]["value"] == HF_HOME
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        cache = next(v for v in spec["volumes"] if v["name"] == mounts[HF_HOME])
        assert cache["name"] == "model-cache"
        assert ("emptyDir" in cache) != ("persistentVolumeClaim" in cache)


def test_only_gpu_workers_ask_for_gpus(rendered: list[dict[str, Any]]) -> None:
    gpu_deployments = {
        d["metadata"]["name"]
        for d in by_kind(rendered, "Deployment")
        if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers_of(d))
        or pod_spec(d).get("tolerations")
    }
    assert gpu_deployments == {d["metadata"]["name"] for d in workers(rendered).values()}


def test_one_scaledobject_per_worker_on_its_queue(rendered: list[dict[str, Any]]) -> None:
    scaled = by_kind(rendered, "ScaledObject")
    assert len(scaled) == len(workers(rendered))
    auths = {a["metadata"]["name"]: a for a in by_kind(rendered, "TriggerAuthentication")}
    redis_url = secret_example()["stringData"]["MASACTRL_REDIS_URL"]
    database = re.fullmatch(r"rediss?://[^/]*/(\d+)", redis_url).group(1)
    for model, deployment in workers(rendered).items():
        (obj,) = [
            s
            for s in scaled
            if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        ]
        spec = obj["spec"]
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["cooldownPeriod"] >= 300
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis"
        metadata = trigger["metadata"]
        # Celery's Redis broker keeps a queue's pending messages in a list named after it.
        assert metadata["listName"] == queue_name(model) == f"masactrl.{model}"
        assert metadata["listName"] != WEBHOOK_QUEUE
        assert int(metadata["listLength"]) >= 1
        assert metadata["databaseIndex"] == database
        # The address comes from the target's own environment (the shared ConfigMap).
        (container,) = pod_spec(deployment)["containers"]
        env = effective_env(rendered, container)
        assert env[metadata["addressFromEnv"]] == ("config", CONFIG, "REDIS_ADDRESS")
        assert re.fullmatch(r"[a-z0-9.-]+:\d+", config_data(rendered, CONFIG)["REDIS_ADDRESS"])
        # The password through a TriggerAuthentication, never in the trigger's metadata.
        assert not any("password" in key.lower() for key in metadata if key != "passwordFromEnv")
        auth = auths[trigger["authenticationRef"]["name"]]
        assert {"parameter": "password", "name": SECRET, "key": "REDIS_PASSWORD"} in auth["spec"][
            "secretTargetRef"
        ]


def test_webhook_worker(rendered: list[dict[str, Any]]) -> None:
    deployment = one(rendered, "Deployment", "masactrl-worker-webhooks")
    (container,) = pod_spec(deployment)["containers"]
    assert container["args"] == ["worker", "--webhooks"]
    # The torch-free gateway image, same name and tag as the gateway's.
    (gateway_container,) = pod_spec(gateway(rendered))["containers"]
    assert container["image"] == gateway_container["image"]
    assert deployment["spec"]["replicas"] >= 1


# --- images, namespaces, overlays -------------------------------------------------------------


def test_images_are_pinned(rendered: list[dict[str, Any]]) -> None:
    for resource in rendered:
        for container in containers_of(resource):
            _, tag, digest = split_image(container["image"])
            assert (tag and tag != "latest") or digest, container["image"]
            assert container["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize(
    ("target", "namespace", "tag"),
    [("overlays/dev", "masactrl-dev", "0.1.0-dev"), ("overlays/prod", "masactrl", "0.1.0")],
)
def test_overlay_namespace_and_images(target: str, namespace: str, tag: str) -> None:
    resources = render(target)
    assert {r["metadata"]["namespace"] for r in resources} == {namespace}
    images = {c["image"] for r in resources for c in containers_of(r)}
    assert images == {
        f"registry.example.com/masactrl/gateway:{tag}",
        f"registry.example.com/masactrl/worker:{tag}",
    }


def test_dev_overlay_is_small_and_scales_to_zero() -> None:
    resources = render("overlays/dev")
    hpa = one(resources, "HorizontalPodAutoscaler", "masactrl-gateway")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 2)
    assert one(resources, "PodDisruptionBudget", "masactrl-gateway")["spec"]["maxUnavailable"] == 1
    scaled = one(resources, "ScaledObject", "masactrl-worker-sd15")["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (0, 1)
    assert one(resources, "Deployment", "masactrl-worker-webhooks")["spec"]["replicas"] == 1
    config = config_data(resources, CONFIG)
    assert config["MASACTRL_S3_ENDPOINT_URL"].startswith("http://minio.masactrl-dev.svc")


def test_prod_overlay_keeps_a_warm_worker_and_shares_the_model_cache() -> None:
    resources = render("overlays/prod")
    hpa = one(resources, "HorizontalPodAutoscaler", "masactrl-gateway")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    assert one(resources, "PodDisruptionBudget", "masactrl-gateway")["spec"]["minAvailable"] == 2
    scaled = one(resources, "ScaledObject", "masactrl-worker-sd15")["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (1, 8)
    assert one(resources, "Deployment", "masactrl-worker-webhooks")["spec"]["replicas"] == 2
    worker = one(resources, "Deployment", "masactrl-worker-sd15")
    (cache,) = [v for v in pod_spec(worker)["volumes"] if v["name"] == "model-cache"]
    assert cache == {
        "name": "model-cache",
        "persistentVolumeClaim": {"claimName": "masactrl-model-cache"},
    }
    pvc = one(resources, "PersistentVolumeClaim", "masactrl-model-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    spread = pod_spec(gateway(resources))["topologySpreadConstraints"]
    assert spread[0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert "MASACTRL_S3_ENDPOINT_URL" not in config_data(resources, CONFIG)  # AWS S3


def test_base_model_cache_is_a_bounded_emptydir() -> None:
    worker = one(render("base"), "Deployment", "masactrl-worker-sd15")
    (cache,) = [v for v in pod_spec(worker)["volumes"] if v["name"] == "model-cache"]
    assert cache == {"name": "model-cache", "emptyDir": {"sizeLimit": "30Gi"}}


def test_catalog_json_in_base_is_pretty_and_parses() -> None:
    text = (REPO / "deploy" / "base" / "configmap.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    catalog = next(d for d in docs if d["metadata"]["name"] == CATALOG)
    assert json.loads(catalog["data"]["catalog.json"])["default"] == "sd15"


# --- network policies -------------------------------------------------------------------------

COMPONENTS = {
    "gateway": "masactrl-gateway",
    "worker": "masactrl-worker-sd15",
    "webhooks": "masactrl-worker-webhooks",
}
PUBLIC_ADDRESSES = ["52.216.8.1", "2600:1f18:4a3:6900::1"]  # e.g. S3, a webhook receiver
INTERNAL_ADDRESSES = ["169.254.169.254", "10.1.2.3", "172.20.0.5", "192.168.1.1", "127.0.0.1"]
INTERNAL_ADDRESSES += ["fd00:ec2::254", "::ffff:169.254.169.254"]


def pod_of(deployment: dict[str, Any]) -> Endpoint:
    (container,) = pod_spec(deployment)["containers"]
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    return Endpoint(deployment["metadata"].get("namespace"), pod_labels(deployment), ports)


def masactrl_pods(resources: list[dict[str, Any]]) -> dict[str, Endpoint]:
    return {c: pod_of(one(resources, "Deployment", name)) for c, name in COMPONENTS.items()}


def namespace_of(resources: list[dict[str, Any]]) -> str | None:
    return one(resources, "Deployment", "masactrl-gateway")["metadata"].get("namespace")


def in_cluster_redis(namespace: str | None) -> Endpoint:
    return Endpoint(namespace, {"app.kubernetes.io/name": "redis"}, {"redis": 6379})


KUBE_DNS = Endpoint("kube-system", {"k8s-app": "kube-dns"})
KEDA_OPERATOR = Endpoint("keda", {"app.kubernetes.io/name": "keda-operator"})


def test_every_masactrl_pod_is_isolated_both_ways(rendered: list[dict[str, Any]]) -> None:
    policies = by_kind(rendered, "NetworkPolicy")
    for deployment in by_kind(rendered, "Deployment"):
        labels = pod_labels(deployment)
        for direction in ("Ingress", "Egress"):
            assert any(
                direction in p["spec"]["policyTypes"]
                and label_selector_matches(p["spec"]["podSelector"], labels)
                for p in policies
            ), (deployment["metadata"]["name"], direction)
    for policy in policies:  # explicit types: an omitted one is inferred, easy to misread
        assert set(policy["spec"]["policyTypes"]) <= {"Ingress", "Egress"}


def test_only_the_gateway_accepts_connections(rendered: list[dict[str, Any]]) -> None:
    policies = by_kind(rendered, "NetworkPolicy")
    pods = masactrl_pods(rendered)
    stranger = Endpoint(namespace_of(rendered), {"app": "debug"})
    outside = Endpoint(ip="203.0.113.7")
    for source in (stranger, outside, KEDA_OPERATOR):
        assert connection_allowed(policies, source, pods["gateway"], 8000)
        assert not connection_allowed(policies, source, pods["gateway"], 22)
        for component in ("worker", "webhooks"):
            for port in (8000, 22, 9100):
                assert not connection_allowed(policies, source, pods[component], port)
    # Not even the gateway reaches a worker: they share work only through Redis.
    assert not connection_allowed(policies, pods["gateway"], pods["worker"], 8000)


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_egress_is_dns_redis_and_public_https(
    rendered: list[dict[str, Any]], component: str
) -> None:
    policies = by_kind(rendered, "NetworkPolicy")
    pod = masactrl_pods(rendered)[component]
    assert connection_allowed(policies, pod, KUBE_DNS, 53, "UDP")
    assert connection_allowed(policies, pod, KUBE_DNS, 53, "TCP")
    assert not connection_allowed(policies, pod, Endpoint(ip="8.8.8.8"), 53, "UDP")
    for address in PUBLIC_ADDRESSES:
        assert connection_allowed(policies, pod, Endpoint(ip=address), 443)
        for port in (80, 22, 6379):
            assert not connection_allowed(policies, pod, Endpoint(ip=address), port)
    # Defence in depth behind the SSRF guard: the metadata endpoint and private ranges are out.
    for address in INTERNAL_ADDRESSES:
        assert not connection_allowed(policies, pod, Endpoint(ip=address), 443), address
    stranger = Endpoint(namespace_of(rendered), {"app": "debug"}, {"http": 8080})
    assert not connection_allowed(policies, pod, stranger, 8080)


@pytest.mark.parametrize("target", ["base", "overlays/dev"])  # prod's Redis is managed
def test_in_cluster_redis_accepts_only_masactrl_and_keda(target: str) -> None:
    rendered = render(target)
    policies = by_kind(rendered, "NetworkPolicy")
    redis = in_cluster_redis(namespace_of(rendered))
    for component, pod in masactrl_pods(rendered).items():
        assert connection_allowed(policies, pod, redis, 6379), component
        assert not connection_allowed(policies, pod, redis, 6380), component
    assert connection_allowed(policies, KEDA_OPERATOR, redis, 6379)
    for source in (
        Endpoint(namespace_of(rendered), {"app": "debug"}),
        Endpoint("other", {"app.kubernetes.io/name": "masactrl"}),  # same labels, wrong namespace
        Endpoint("other", {"app.kubernetes.io/name": "keda-operator"}),
        Endpoint(ip="203.0.113.7"),
    ):
        assert not connection_allowed(policies, source, redis, 6379), source


def test_prod_reaches_its_managed_redis_by_address() -> None:
    resources = render("overlays/prod")
    policies = by_kind(resources, "NetworkPolicy")
    managed = Endpoint(ip="10.0.32.15")
    for component, pod in masactrl_pods(resources).items():
        assert connection_allowed(policies, pod, managed, 6379), component
        assert not connection_allowed(policies, pod, managed, 443), component
        assert not connection_allowed(policies, pod, Endpoint(ip="10.9.9.9"), 6379), component
        redis_pod = in_cluster_redis("masactrl")
        assert not connection_allowed(policies, pod, redis_pod, 6379), component


def test_dev_reaches_minio_in_its_namespace() -> None:
    resources = render("overlays/dev")
    policies = by_kind(resources, "NetworkPolicy")
    minio = Endpoint("masactrl-dev", {"app.kubernetes.io/name": "minio"})
    for component, pod in masactrl_pods(resources).items():
        assert connection_allowed(policies, pod, minio, 9000), component
        assert not connection_allowed(policies, pod, minio, 9001), component  # its console
    # The S3 port in the base is HTTPS to public addresses; the MinIO policy exists only in dev.
    base = by_kind(render("base"), "NetworkPolicy")
    gateway_pod = masactrl_pods(render("base"))["gateway"]
    assert not connection_allowed(base, gateway_pod, Endpoint(None, minio.labels), 9000)
