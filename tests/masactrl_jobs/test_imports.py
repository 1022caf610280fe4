"""masactrl_jobs is shared with the gateway, which must never pay for (or need) torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import importlib, json, pkgutil, sys
import masactrl_jobs
names = sorted(m.name for m in pkgutil.iter_modules(masactrl_jobs.__path__, "masactrl_jobs."))
for name in names:
    importlib.import_module(name)
heavy = [m for m in ("torch", "diffusers", "transformers", "masactrl_core") if m in sys.modules]
print(json.dumps({"modules": names, "heavy": heavy}))
"""


def test_importing_every_masactrl_jobs_module_leaves_torch_out() -> None:
    # A fresh interpreter: this test process may already have torch from other tests.
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("settings", "catalog", "storage", "netguard", "images"):
        assert f"masactrl_jobs.{name}" in report["modules"]
    assert report["heavy"] == []


def test_the_package_itself_is_import_light() -> None:
    probe = (
        "import sys, masactrl_jobs; "
        "print(sorted(m for m in ('boto3', 'PIL', 'httpx', 'redis', 'celery') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
