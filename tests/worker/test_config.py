"""Worker settings, the Celery configuration, the CLI's errors and what the webhook side imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from masactrl_cli.main import main
from masactrl_jobs.settings import ConfigurationError, load_settings
from tests.worker.helpers import REPO_ROOT, tiny_catalog
from worker.celery_app import create_worker_app
from worker.config import WorkerSettings


def make(**values: Any) -> WorkerSettings:
    return load_settings(WorkerSettings, _env_file=None, environment="development", **values)


def test_defaults_recover_a_dead_workers_job_within_a_minute() -> None:
    settings = make()
    assert settings.recovery_seconds == 60
    assert settings.lease_ttl == 30 and settings.lease_renew_interval == 10
    assert settings.janitor_interval == 15
    assert settings.lease_ttl + settings.janitor_interval <= settings.recovery_seconds
    assert (
        settings.soft_time_limit_seconds
        < settings.time_limit_seconds
        < settings.visibility_timeout_seconds
    )
    assert settings.webhook_retry_delays_seconds == [5, 300, 1800, 7200]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"soft_time_limit_seconds": 60, "time_limit_seconds": 60}, "TIME_LIMIT_SECONDS must be"),
        ({"time_limit_seconds": 700, "visibility_timeout_seconds": 600}, "VISIBILITY_TIMEOUT"),
        ({"lease_ttl_seconds": 50, "janitor_interval_seconds": 20}, "must not exceed"),
    ],
)
def test_inconsistent_times_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        make(**values)


def test_the_step_delay_is_refused_in_production() -> None:
    with pytest.raises(ConfigurationError, match="STEP_DELAY"):
        load_settings(
            WorkerSettings,
            _env_file=None,
            environment="production",
            url_signing_secret="x" * 8 + "a-long-random-production-secret-value",
            step_delay_seconds=0.1,
        )


def test_retry_delays_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASACTRL_WEBHOOK_RETRY_DELAYS_SECONDS", "[0.5, 2]")
    assert make().webhook_retry_delays_seconds == [0.5, 2]


def test_the_celery_app_is_configured_for_late_acks_and_one_job_at_a_time() -> None:
    settings = make(visibility_timeout_seconds=4000)
    app = create_worker_app(settings)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.broker_transport_options["visibility_timeout"] == 4000
    run_job = app.tasks["masactrl.run_job"]
    assert run_job.acks_late and run_job.reject_on_worker_lost
    assert (run_job.soft_time_limit, run_job.time_limit) == (600, 660)
    assert app.tasks["masactrl.deliver_webhook"].acks_late


def test_the_worker_command_explains_bad_invocations(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MASACTRL_ENVIRONMENT", "development")
    assert main(["worker"]) == 2
    assert "--model NAME" in capsys.readouterr().err

    assert main(["worker", "--model", "nope"]) == 2
    assert "unknown model 'nope'; available: sd15, sdxl" in capsys.readouterr().err

    monkeypatch.setenv("MASACTRL_CATALOG", tiny_catalog(tmp_path / "missing"))
    assert main(["worker", "--model", "tiny", "--webhooks"]) == 2  # one role only
    capsys.readouterr()

    monkeypatch.setenv("MASACTRL_SOFT_TIME_LIMIT_SECONDS", "900")
    assert main(["worker", "--webhooks"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("masactrl worker: error: invalid configuration")
    assert "MASACTRL_TIME_LIMIT_SECONDS" in err


def test_the_webhook_worker_never_imports_torch() -> None:
    code = (
        "import sys, masactrl_cli.worker, worker.main, worker.runtime, worker.tasks, "
        "worker.webhooks, worker.janitor\n"
        "from worker.celery_app import create_worker_app\n"
        "from worker.config import WorkerSettings\n"
        "create_worker_app(WorkerSettings(_env_file=None, environment='development'))\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr


def test_every_worker_setting_is_documented() -> None:
    from masactrl_jobs.settings import CommonSettings

    text = (REPO_ROOT / "docs" / "workers.md").read_text()
    own = set(WorkerSettings.model_fields) - set(CommonSettings.model_fields)
    missing = sorted(
        f"MASACTRL_{name.upper()}" for name in own if f"MASACTRL_{name.upper()}`" not in text
    )
    assert not missing


def test_a_worker_whose_model_folder_is_missing_exits_1_in_one_line(tmp_path: Path) -> None:
    # A real process: the source is checked before Celery starts (no Redis needed, no torch),
    # so the answer is one sentence and exit 1, not a pool child's traceback.
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "MASACTRL_ENVIRONMENT": "development",
        "MASACTRL_URL_SIGNING_SECRET": "a-test-secret-of-enough-length-for-signing",
        "MASACTRL_CATALOG": tiny_catalog(tmp_path / "models/gone"),
    }
    code = (
        "import sys\n"
        "from masactrl_cli.main import main\n"
        "status = main(['worker', '--model', 'tiny'])\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip() == "torch not imported"
    assert done.stderr.splitlines() == [
        f"masactrl worker: error: model tiny: source {tmp_path / 'models/gone'}: "
        "no such folder or file"
    ]
