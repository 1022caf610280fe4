"""The two Dockerfiles and the build context, read as text (no Docker engine here)."""

from __future__ import annotations

import re
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from tests.deploy.manifests import (
    REPO,
    Stage,
    dockerignore_excludes,
    exec_form,
    load_compose,
    parse_dockerfile,
    split_image,
)

DOCKERFILES = {
    "gateway": REPO / "docker" / "gateway.Dockerfile",
    "worker": REPO / "docker" / "worker.Dockerfile",
}
REQUIREMENTS_SCRIPT = REPO / "docker" / "pyproject_requirements.py"
APP_UID = 10001
HF_HOME = "/var/cache/huggingface"


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the images run 3.12
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def stages(which: str) -> list[Stage]:
    return parse_dockerfile(DOCKERFILES[which])[1]


def run_lines(stage: Stage) -> str:
    return "\n".join(stage.args("RUN"))


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_multi_stage_with_a_builder(which: str) -> None:
    built = stages(which)
    assert [stage.name for stage in built] == ["builder", "runtime"]
    runtime = built[-1]
    assert runtime.args("COPY") == ["--from=builder /opt/venv /opt/venv"]
    # Nothing is pip-installed in the runtime stage: it only receives the builder's venv.
    assert "pip install" not in run_lines(runtime)
    assert "pip install" in run_lines(built[0])


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_runtime_runs_as_a_fixed_non_root_user(which: str) -> None:
    runtime = stages(which)[-1]
    users = runtime.args("USER")
    assert users == [f"{APP_UID}:{APP_UID}"]
    # USER comes after every RUN, so nothing later runs as root again.
    names = [name for name, _ in runtime.instructions]
    assert max(i for i, n in enumerate(names) if n == "RUN") < names.index("USER")
    assert f"--uid {APP_UID}" in run_lines(runtime)


@pytest.mark.parametrize("which", sorted(DOCKERFILES))
def test_base_images_are_pinned(which: str) -> None:
    for stage in stages(which):
        name, tag, digest = split_image(stage.base)
        assert tag and tag != "latest", stage.base
        assert "$" not in stage.base, f"unresolved ARG in {stage.base}"
        assert digest or re.search(r"\d+\.\d+\.\d+", tag), f"{stage.base} is not an exact version"


def test_gateway_is_python_slim_without_torch() -> None:
    built = stages("gateway")
    assert {stage.base for stage in built} == {"python:3.12.12-slim-bookworm"}
    text = DOCKERFILES["gateway"].read_text()
    assert "[ml]" not in text and "--extra" not in text
    builder = run_lines(built[0])
    # Everything from the hash-checked base lock; then pyproject.toml's requirements must already
    # be met without an index (a stale lock fails the build), and the project adds nothing.
    assert "pip install --require-hashes --no-deps -r gateway.txt" in builder
    assert "python pyproject_requirements.py > /tmp/requirements.txt" in builder
    assert "pip install --no-index -r /tmp/requirements.txt" in builder
    assert re.search(r"pip install --no-deps \.(\s|$)", builder)
    assert "pip check" in builder
    # The build fails if torch got in anyway.
    assert "find_spec('torch') is not None" in builder


def test_worker_is_cuda_with_the_ml_extra() -> None:
    built = stages("worker")
    assert {stage.base for stage in built} == {"nvidia/cuda:13.0.2-base-ubuntu24.04"}
    builder = run_lines(built[0])
    # torch (the CUDA build) first, then base + ml from the hash-checked worker lock, checked
    # offline against everything pyproject.toml declares with the ml extra.
    assert builder.index('"torch==${TORCH_VERSION}"') < builder.index("-r worker.txt")
    assert "pip install --require-hashes --no-deps -r worker.txt" in builder
    assert "pyproject_requirements.py --extra ml > /tmp/requirements.txt" in builder
    assert "pip install --no-index -r /tmp/requirements.txt" in builder
    assert re.search(r"pip install --no-deps \.(\s|$)", builder)
    assert "pip check" in builder
    runtime = built[-1]
    env = " ".join(runtime.args("ENV"))
    assert f"HF_HOME={HF_HOME}" in env
    # Catalog models with an s3:// source are cached on the same volume.
    assert f"MASACTRL_MODEL_CACHE_DIR={HF_HOME}/" in env
    assert exec_form(runtime.args("VOLUME")[0]) == [HF_HOME]
    assert f"chown {APP_UID}:{APP_UID} {HF_HOME}" in run_lines(runtime)


def test_worker_torch_matches_the_development_pin() -> None:
    global_args, built = parse_dockerfile(DOCKERFILES["worker"])
    pinned = next(args for name, args in built[0].instructions if args.startswith("TORCH_VERSION="))
    makefile = (REPO / "Makefile").read_text()
    (development,) = re.findall(r"^TORCH_VERSION := (\S+)$", makefile, flags=re.M)
    assert pinned.split("=", 1)[1] == development


@pytest.mark.parametrize(("which", "lock"), [("gateway", "gateway.txt"), ("worker", "worker.txt")])
def test_images_install_their_lock(which: str, lock: str) -> None:
    builder = stages(which)[0]
    copies = [exec_form(args) for args in builder.args("COPY")]
    assert any(f"requirements/{lock}" in sources for sources in copies), copies
    # The lock goes in before the source, so a source edit reuses the dependency layer.
    names = [name for name, _ in builder.instructions]
    lock_copy = next(
        i for i, (n, a) in enumerate(builder.instructions) if lock in a and n == "COPY"
    )
    assert lock_copy < names.index("COPY", lock_copy + 1)


@pytest.mark.parametrize(
    ("which", "command"),
    [
        ("gateway", ["serve", "--host", "0.0.0.0", "--port", "8000"]),
        ("worker", ["worker", "--model", "sd15"]),
    ],
)
def test_entrypoint_is_the_cli(which: str, command: list[str]) -> None:
    runtime = stages(which)[-1]
    assert exec_form(runtime.args("ENTRYPOINT")[0]) == ["masactrl"]
    assert exec_form(runtime.args("CMD")[0]) == command


def test_compose_builds_these_dockerfiles() -> None:
    services = load_compose()["services"]
    assert services["gateway"]["build"]["dockerfile"] == "docker/gateway.Dockerfile"
    assert services["worker-sd15"]["build"]["dockerfile"] == "docker/worker.Dockerfile"
    for service in services.values():
        if "build" in service:
            assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def requirements(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(REQUIREMENTS_SCRIPT), "--pyproject", str(REPO / "pyproject.toml")]
        + list(args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_requirements_script_separates_base_and_ml() -> None:
    project = pyproject()["project"]
    base = requirements()
    assert base == project["dependencies"]
    assert not any(line.lower().startswith("torch") for line in base)
    with_ml = requirements("--extra", "ml")
    assert with_ml == project["dependencies"] + project["optional-dependencies"]["ml"]
    assert any(line.startswith("torch") for line in with_ml)


def test_requirements_script_refuses_an_unknown_extra() -> None:
    result = subprocess.run(
        [sys.executable, str(REQUIREMENTS_SCRIPT), "--pyproject", str(REPO / "pyproject.toml")]
        + ["--extra", "gpu"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "has no extra gpu" in result.stderr


def dockerignore() -> list[str]:
    return (REPO / ".dockerignore").read_text().splitlines()


@pytest.mark.parametrize(
    "path", [".env", ".env.production", ".git/config", ".venv/bin/python", "var/storage/x", "tests"]
)
def test_dockerignore_keeps_secrets_and_local_state_out(path: str) -> None:
    assert dockerignore_excludes(dockerignore(), path)


def packages() -> list[str]:
    """Top-level Python packages of the distribution (folders with __init__.py, not tests)."""
    return sorted(
        p.parent.name
        for p in REPO.glob("*/__init__.py")
        if p.parent.name not in {"tests"} and not p.parent.name.startswith(".")
    )


def test_dockerignore_keeps_what_pip_install_needs() -> None:
    needed = ["pyproject.toml", "README.md", "docker/pyproject_requirements.py"]
    needed += ["requirements/gateway.txt", "requirements/worker.txt"]
    needed += [f"{package}/__init__.py" for package in packages()]
    for path in needed:
        assert not dockerignore_excludes(dockerignore(), path), path


def test_every_package_is_in_the_distribution() -> None:
    """`pip install .` in the images ships only what packages.find includes: a package left out
    installs nowhere and the containers fail at import."""
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    missing = [p for p in packages() if not any(fnmatchcase(p, pattern) for pattern in include)]
    assert "masactrl_jobs" in packages()
    assert missing == [], f"add {missing} to [tool.setuptools.packages.find] include"


def test_dockerfiles_copy_only_files_that_exist() -> None:
    for path in DOCKERFILES.values():
        for stage in parse_dockerfile(path)[1]:
            for args in stage.args("COPY"):
                words = [w for w in args.split() if not w.startswith("--")]
                if any(w.startswith("--from") for w in args.split()):
                    continue
                for source in words[:-1]:
                    assert source == "." or Path(REPO, source).exists(), (path.name, source)
