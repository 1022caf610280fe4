"""The readers in manifests.py: the compose interpolation, the Dockerfile parser and the kustomize
walk must be right before the invariants checked with them mean anything."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import (
    DEPLOY,
    Endpoint,
    MissingVariable,
    UnsupportedKustomization,
    connection_allowed,
    dockerignore_excludes,
    interpolate_string,
    kustomize,
    label_selector_matches,
    parse_dockerfile,
    references,
    split_image,
    strategic_merge,
)

TARGETS = ["base", "overlays/dev", "overlays/prod"]


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "value", "EMPTY": ""}
    assert interpolate_string("${SET:-d}|${EMPTY:-d}|${UNSET:-d}", env) == "value|d|d"
    assert interpolate_string("${EMPTY-d}|${UNSET-d}", env) == "|d"
    assert interpolate_string("${SET:?boom}", env) == "value"
    assert interpolate_string("$$SET and $${SET}", env) == "$SET and ${SET}"
    with pytest.raises(MissingVariable) as missing:
        interpolate_string("x${EMPTY:?Variable not set}", env)
    assert missing.value.name == "EMPTY"
    with pytest.raises(MissingVariable):
        interpolate_string("${UNSET?needed}", env)
    assert interpolate_string("${EMPTY?needed}", env) == ""


def test_references_skip_escaped_dollars() -> None:
    found = references('redis://:${PW:?Variable not set}@h "$$NOT_A_REF" ${PORT:-1}')
    assert [(r.name, r.operator, r.argument) for r in found] == [
        ("PW", ":?", "Variable not set"),
        ("PORT", ":-", "1"),
    ]


def test_dockerfile_parser_resolves_stages(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "# comment\nARG BASE=python:3.12.1-slim\nFROM ${BASE} AS builder\nRUN a \\\n"
        "    # inside\n && b\nFROM --platform=linux/amd64 $BASE\nUSER 10001\n"
    )
    global_args, stages = parse_dockerfile(dockerfile)
    assert global_args == {"BASE": "python:3.12.1-slim"}
    assert [(s.base, s.name) for s in stages] == [
        ("python:3.12.1-slim", "builder"),
        ("python:3.12.1-slim", None),
    ]
    assert stages[0].args("RUN") == ["a  && b"]
    assert stages[1].args("USER") == ["10001"]


def test_dockerignore_matching() -> None:
    patterns = [".env", "docs", "**/__pycache__", "*.md", "!README.md"]
    assert dockerignore_excludes(patterns, ".env")
    assert dockerignore_excludes(patterns, "docs/deployment.md")
    assert dockerignore_excludes(patterns, "service/api/__pycache__/x.pyc")
    assert dockerignore_excludes(patterns, "CHANGES.md")
    assert not dockerignore_excludes(patterns, "README.md")
    assert not dockerignore_excludes(patterns, "service/main.py")


def test_split_image() -> None:
    assert split_image("redis:7.4.6-alpine") == ("redis", "7.4.6-alpine", None)
    assert split_image("registry:5000/a/b") == ("registry:5000/a/b", None, None)
    assert split_image("r:5000/a/b:1.0@sha256:ab") == ("r:5000/a/b", "1.0", "sha256:ab")


def test_strategic_merge_keys_nulls_and_custom_resources() -> None:
    base = {
        "spec": {
            "volumes": [{"name": "a", "emptyDir": {}}, {"name": "b", "emptyDir": {}}],
            "containers": [{"name": "c", "env": [{"name": "X", "value": "1"}]}],
        }
    }
    patch = {
        "spec": {
            "volumes": [
                {"name": "b", "emptyDir": None, "persistentVolumeClaim": {"claimName": "p"}}
            ],
            "containers": [{"name": "c", "env": [{"name": "Y", "value": "2"}]}],
        }
    }
    strategic_merge(base, patch, builtin=True)
    assert base["spec"]["volumes"] == [
        {"name": "a", "emptyDir": {}},
        {"name": "b", "persistentVolumeClaim": {"claimName": "p"}},
    ]
    assert [e["name"] for e in base["spec"]["containers"][0]["env"]] == ["X", "Y"]

    custom = {"spec": {"triggers": [{"type": "redis"}, {"type": "cpu"}]}}
    strategic_merge(custom, {"spec": {"triggers": [{"type": "cron"}]}}, builtin=False)
    assert custom == {"spec": {"triggers": [{"type": "cron"}]}}


def test_walk_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("secretGenerator:\n  - name: x\n")
    with pytest.raises(UnsupportedKustomization, match="secretGenerator"):
        kustomize(tmp_path)


def _normalized(node: Any) -> Any:
    """Order-insensitive for lists of named items: kustomize moves patched items first."""
    if isinstance(node, dict):
        return {key: _normalized(value) for key, value in node.items()}
    if isinstance(node, list):
        items = [_normalized(item) for item in node]
        if items and all(isinstance(item, dict) and "name" in item for item in items):
            items.sort(key=lambda item: str(item["name"]))
        return items
    return node


def _keyed(resources: list[dict[str, Any]]) -> dict[tuple[str, str, str], Any]:
    return {
        (r["kind"], r["metadata"].get("namespace", ""), r["metadata"]["name"]): _normalized(r)
        for r in resources
    }


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed here")
@pytest.mark.parametrize("target", TARGETS)
def test_walk_matches_kubectl_kustomize(target: str) -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    theirs = _keyed([doc for doc in yaml.safe_load_all(rendered) if doc])
    mine = _keyed(kustomize(DEPLOY / target))
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        assert mine[key] == theirs[key], key


def policy(name: str, spec: dict[str, Any], namespace: str = "app") -> dict[str, Any]:
    return {
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def test_network_policies_add_up_and_isolate_what_they_select() -> None:
    web = Endpoint("app", {"role": "web"}, {"http": 8080})
    db = Endpoint("app", {"role": "db"})
    other_namespace = Endpoint("elsewhere", {"role": "web"})
    # No policy: everything is allowed.
    assert connection_allowed([], web, db, 5432)
    deny_db = policy(
        "deny-db",
        {"podSelector": {"matchLabels": {"role": "db"}}, "policyTypes": ["Ingress"], "ingress": []},
    )
    assert not connection_allowed([deny_db], web, db, 5432)
    assert connection_allowed([deny_db], db, web, 8080)  # web is not selected: not isolated
    allow_web = policy(
        "web-to-db",
        {
            "podSelector": {"matchLabels": {"role": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"role": "web"}}}],
                    "ports": [{"port": 5432}],
                }
            ],
        },
    )
    assert connection_allowed([deny_db, allow_web], web, db, 5432)
    assert not connection_allowed([deny_db, allow_web], web, db, 5433)
    # A bare podSelector peer means the policy's own namespace.
    assert not connection_allowed([deny_db, allow_web], other_namespace, db, 5432)


def test_network_policy_peers_ports_and_address_blocks() -> None:
    web = Endpoint("app", {"role": "web"}, {"http": 8080})
    egress = policy(
        "web-out",
        {
            "podSelector": {
                "matchExpressions": [{"key": "role", "operator": "In", "values": ["web"]}]
            },
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                    "ports": [{"port": 443, "protocol": "TCP"}],
                },
                # namespaceSelector and podSelector in one peer: both must match.
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "dns"}
                            },
                            "podSelector": {"matchLabels": {"k8s-app": "dns"}},
                        }
                    ],
                    "ports": [{"port": 53, "protocol": "UDP"}],
                },
            ],
        },
    )
    assert connection_allowed([egress], web, Endpoint(ip="1.2.3.4"), 443)
    assert not connection_allowed([egress], web, Endpoint(ip="10.2.3.4"), 443)
    assert not connection_allowed([egress], web, Endpoint(ip="1.2.3.4"), 443, "UDP")
    assert not connection_allowed([egress], web, Endpoint(ip="2001:db8::1"), 443)  # v4 block only
    assert connection_allowed([egress], web, Endpoint("dns", {"k8s-app": "dns"}), 53, "UDP")
    assert not connection_allowed([egress], web, Endpoint("dns", {"k8s-app": "x"}), 53, "UDP")
    assert not connection_allowed([egress], web, Endpoint("app", {"k8s-app": "dns"}), 53, "UDP")
    # A named port is the destination pod's container port.
    named = policy(
        "named",
        {
            "podSelector": {"matchLabels": {"role": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": "http"}]}],
        },
    )
    assert connection_allowed([named], Endpoint(ip="1.2.3.4"), web, 8080)
    assert not connection_allowed([named], Endpoint(ip="1.2.3.4"), web, 8081)
    assert label_selector_matches({}, {"any": "thing"})
    assert not label_selector_matches(
        {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["x"]}]}, {"a": "x"}
    )
