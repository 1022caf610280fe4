"""Readers for the deployment files, small enough to trust without Docker or kubectl.

- :func:`interpolate` applies docker compose's ``${VAR...}`` rules to a parsed compose file.
- :func:`parse_dockerfile` splits a Dockerfile into stages of (instruction, arguments).
- :func:`kustomize` renders a kustomization the simple way this repository uses kustomize:
  ``resources`` (files and directories), strategic-merge ``patches`` by kind and name,
  ``namespace``, ``labels`` (metadata only), ``images`` and ``replicas``. Anything else in a
  kustomization.yaml raises, so a feature the walk does not implement cannot be silently ignored;
  where ``kubectl`` exists a test compares this walk with ``kubectl kustomize``.
- :func:`connection_allowed` answers whether rendered NetworkPolicies let one endpoint reach
  another on a port, following the Kubernetes rules (policies add up; a pod selected by a policy
  of a type is isolated for that type).
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

# ---------------------------------------------------------------------------------------------
# docker compose interpolation


class MissingVariable(ValueError):
    """A ``${VAR:?}`` / ``${VAR?}`` reference whose variable is unset (or empty, for ``:?``)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"required variable {name} is missing a value: {message}")
        self.name = name


@dataclass(frozen=True)
class Reference:
    """One ``${...}`` in a compose value: the variable, its operator (``:-``, ``:?``...), its
    argument, and the whole text."""

    name: str
    operator: str
    argument: str
    text: str


_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def references(value: str) -> list[Reference]:
    """The variable references in one string (``$$`` escapes are not references)."""
    found = []
    for match in _REFERENCE.finditer(value):
        if match["escaped"]:
            continue
        name = match["braced"] or match["bare"]
        found.append(Reference(name, match["op"] or "", match["arg"] or "", match.group(0)))
    return found


def interpolate_string(value: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        is_set = name in env
        non_empty = is_set and env[name] != ""
        if op == ":-":
            return env[name] if non_empty else arg
        if op == "-":
            return env[name] if is_set else arg
        if op == ":?":
            if not non_empty:
                raise MissingVariable(name, arg)
            return env[name]
        if op == "?":
            if not is_set:
                raise MissingVariable(name, arg)
            return env[name]
        if op == ":+":
            return arg if non_empty else ""
        if op == "+":
            return arg if is_set else ""
        return env.get(name, "")

    return _REFERENCE.sub(replace, value)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    """The compose document with every string value interpolated, as compose does."""
    if isinstance(node, str):
        return interpolate_string(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def all_references(node: Any) -> list[Reference]:
    if isinstance(node, str):
        return references(node)
    if isinstance(node, list):
        return [ref for item in node for ref in all_references(item)]
    if isinstance(node, dict):
        return [ref for value in node.values() for ref in all_references(value)]
    return []


def load_compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as compose's .env reader takes them (comments, blank lines, quotes)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{path.name}:{number}: not a KEY=value line: {raw!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults and the stages; ``FROM ${ARG}`` is resolved from those defaults."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not pending:
            continue
        if pending and (not stripped or stripped.startswith("#")):
            continue  # comments and blank lines inside a continued instruction are dropped
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = pending + stripped
        pending = ""
        if line:
            logical.append(line)
    if pending:
        raise ValueError(f"{path.name} ends inside a continued line")

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        args = args.strip()
        if instruction == "ARG" and not stages:
            key, _, default = args.partition("=")
            global_args[key] = default
        elif instruction == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--platform")]
            image = re.sub(
                r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                lambda m: global_args.get(m.group(1), m.group(0)),
                words[0],
            )
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=image, name=name))
        elif not stages:
            raise ValueError(f"{path.name}: {instruction} before the first FROM")
        else:
            stages[-1].instructions.append((instruction, args))
    return global_args, stages


def exec_form(args: str) -> list[str]:
    """The JSON-array (exec) form of CMD/ENTRYPOINT/VOLUME as a list; shell form split."""
    stripped = args.strip()
    if stripped.startswith("["):
        return yaml.safe_load(stripped)
    return shlex.split(stripped)


def dockerignore_excludes(patterns: Iterable[str], path: str) -> bool:
    """Whether .dockerignore ``patterns`` leave ``path`` (relative, POSIX) out of the context.

    Last match wins and ``!`` re-includes, as Docker does; a pattern matching a directory
    excludes everything below it.
    """
    from fnmatch import fnmatchcase

    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = list(prefixes)
        if pattern.startswith("**/"):
            tail = pattern[3:]
            candidates = [
                "/".join(parts[i : j + 1]) for i in range(len(parts)) for j in range(i, len(parts))
            ]
            pattern = tail
        if any(fnmatchcase(candidate, pattern) for candidate in candidates):
            excluded = not negate
    return excluded


# ---------------------------------------------------------------------------------------------
# kustomize, the simple way

SUPPORTED_KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "replicas",
    "patches",
}

# Kinds that belong to no namespace (kustomize leaves their metadata.namespace alone).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ClusterTriggerAuthentication",
}

# Built-in API groups, whose lists merge by key in a strategic merge patch (the patchMergeKey
# of the Kubernetes schema). Lists in custom resources are replaced whole, as kustomize does
# for types it has no schema for.
BUILTIN_API_VERSIONS = {"v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1"}
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "envFrom": None,  # no merge key in the schema: replaced
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}


class UnsupportedKustomization(ValueError):
    """The kustomization uses something this walk does not implement."""


def strategic_merge(base: dict[str, Any], patch: Mapping[str, Any], *, builtin: bool) -> None:
    """Merge ``patch`` into ``base`` in place: maps merge, ``null`` deletes, keyed lists merge."""
    for key, value in patch.items():
        if key == "$patch":
            raise UnsupportedKustomization("$patch directives are not supported")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            strategic_merge(base[key], value, builtin=builtin)
        elif (
            isinstance(value, list)
            and isinstance(base.get(key), list)
            and builtin
            and MERGE_KEYS.get(key)
        ):
            merge_key = MERGE_KEYS[key]
            merged = base[key]
            for item in value:
                match = next((old for old in merged if old.get(merge_key) == item[merge_key]), None)
                if match is None:
                    merged.append(copy.deepcopy(item))
                else:
                    strategic_merge(match, item, builtin=builtin)
        else:
            base[key] = copy.deepcopy(value)


def _pod_specs(resource: dict[str, Any]) -> list[dict[str, Any]]:
    spec = resource.get("spec", {})
    if resource.get("kind") in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        return [spec["template"]["spec"]]
    if resource.get("kind") == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if resource.get("kind") == "Pod":
        return [spec]
    return []


def containers_of(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        container
        for pod in _pod_specs(resource)
        for container in pod.get("initContainers", []) + pod.get("containers", [])
    ]


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port is not a tag."""
    name, _, digest = image.partition("@")
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The resources that ``kubectl kustomize directory`` would print, for this repo's usage."""
    directory = Path(directory)
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(spec) - SUPPORTED_KUSTOMIZATION_FIELDS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: unsupported fields {sorted(unknown)}")

    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = directory / entry
        if target.is_dir():
            resources.extend(kustomize(target))
        elif target.is_file():
            resources.extend(_load_documents(target))
        else:
            raise UnsupportedKustomization(f"{directory}: resource {entry} does not exist")

    for patch_entry in spec.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise UnsupportedKustomization(f"{directory}: only `path:` patches are supported")
        for patch in _load_documents(directory / patch_entry["path"]):
            kind, name = patch["kind"], patch["metadata"]["name"]
            matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
            if len(matches) != 1:
                raise UnsupportedKustomization(
                    f"{directory}: patch for {kind}/{name} matches {len(matches)} resources"
                )
            builtin = patch.get("apiVersion") in BUILTIN_API_VERSIONS
            strategic_merge(matches[0], patch, builtin=builtin)

    namespace = spec.get("namespace")
    for resource in resources:
        if namespace and resource["kind"] not in CLUSTER_SCOPED:
            resource["metadata"]["namespace"] = namespace

    for label_set in spec.get("labels", []):
        if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
            raise UnsupportedKustomization("labels with includeSelectors/includeTemplates")
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(label_set["pairs"])

    for image in spec.get("images", []):
        for resource in resources:
            for container in containers_of(resource):
                name, tag, digest = split_image(container["image"])
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                tag = image.get("newTag", tag)
                digest = image.get("digest", digest)
                container["image"] = (
                    name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
                )

    for replica in spec.get("replicas", []):
        matches = [
            r
            for r in resources
            if r["kind"] in {"Deployment", "StatefulSet"}
            and r["metadata"]["name"] == replica["name"]
        ]
        if not matches:
            raise UnsupportedKustomization(f"replicas: no workload named {replica['name']}")
        for resource in matches:
            resource["spec"]["replicas"] = replica["count"]

    return resources


def by_kind(resources: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def one(resources: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in by_kind(resources, kind) if r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


# ---------------------------------------------------------------------------------------------
# NetworkPolicy semantics


@dataclass(frozen=True)
class Endpoint:
    """One side of a connection: a pod (namespace and labels; named container ports) or an
    address outside the cluster (``ip``)."""

    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)
    ip: str | None = None

    @property
    def is_pod(self) -> bool:
        return self.ip is None

    def namespace_labels(self) -> dict[str, str]:
        # The label the API server sets on every namespace.
        return {"kubernetes.io/metadata.name": self.namespace or "default"}


def label_selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist); ``{}`` matches
    everything."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _policy_namespace(policy: Mapping[str, Any]) -> str:
    return policy["metadata"].get("namespace") or "default"


def _peer_matches(peer: Mapping[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if other.is_pod:
            return False  # ipBlock is meant for addresses outside the cluster
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        cidr = ipaddress.ip_network(block["cidr"])
        if address.version != cidr.version or address not in cidr:
            return False
        return not any(
            address in ipaddress.ip_network(excluded)
            for excluded in block.get("except", [])
            if ipaddress.ip_network(excluded).version == address.version
        )
    if not other.is_pod:
        return False
    if "namespaceSelector" in peer:
        if not label_selector_matches(peer["namespaceSelector"], other.namespace_labels()):
            return False
    elif (other.namespace or "default") != policy_namespace:
        return False
    return label_selector_matches(peer.get("podSelector", {}), other.labels)


def _port_matches(
    rule_ports: list[dict[str, Any]] | None, port: int, protocol: str, target: Endpoint
) -> bool:
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        wanted = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            wanted = target.ports.get(wanted)  # a named port is the destination pod's
            if wanted is None:
                continue
        if wanted <= port <= entry.get("endPort", wanted):
            return True
    return False


def connection_allowed(
    policies: Iterable[dict[str, Any]],
    source: Endpoint,
    target: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether ``source`` may open a connection to ``target`` on ``port``: the source's egress
    and the target's ingress must both allow it (an endpoint outside the cluster has neither)."""
    policies = [p for p in policies if p["kind"] == "NetworkPolicy"]

    def allowed(subject: Endpoint, other: Endpoint, direction: str) -> bool:
        if not subject.is_pod:
            return True
        key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        applying = [
            p
            for p in policies
            if direction in p["spec"]["policyTypes"]
            and _policy_namespace(p) == (subject.namespace or "default")
            and label_selector_matches(p["spec"]["podSelector"], subject.labels)
        ]
        if not applying:
            return True  # not isolated
        for policy in applying:
            for rule in policy["spec"].get(key, []):
                peers = rule.get(peers_key)
                if peers and not any(
                    _peer_matches(peer, _policy_namespace(policy), other) for peer in peers
                ):
                    continue
                if _port_matches(rule.get("ports"), port, protocol, target):
                    return True
        return False

    return allowed(source, target, "Egress") and allowed(target, source, "Ingress")


# ---------------------------------------------------------------------------------------------
# settings, as a process would build them from its environment


def settings_from_environment(cls: Any, environment: Mapping[str, str], monkeypatch: Any) -> Any:
    """Build ``cls`` (a pydantic-settings class) from exactly ``environment``'s MASACTRL_*
    variables, through the environment as the process would (JSON values decoded the same way),
    ignoring any .env file and any MASACTRL_* variable of the test run itself."""
    import os

    from masactrl_jobs.settings import load_settings

    for name in list(os.environ):
        if name.startswith("MASACTRL_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        if name.startswith("MASACTRL_"):
            monkeypatch.setenv(name, str(value))
    return load_settings(cls, _env_file=None)
