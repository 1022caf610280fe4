"""``masactrl worker``: a GPU worker for one model (``--model NAME``) or the webhook worker.

Settings come from ``MASACTRL_*`` (see docs/workers.md). Configuration and catalog problems are
reported in one line before Celery starts; ``--webhooks`` never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import sys

from masactrl_cli.errors import UsageError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    """``--model NAME`` or ``--webhooks``, plus logging and naming options."""
    role = parser.add_mutually_exclusive_group()
    role.add_argument(
        "--model", metavar="NAME", help="catalog model to serve (default: MASACTRL_MODEL)"
    )
    role.add_argument(
        "--webhooks", action="store_true", help="deliver webhooks instead of running jobs"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help="parallel webhook deliveries (default: MASACTRL_WEBHOOK_CONCURRENCY)",
    )
    parser.add_argument("--loglevel", default="INFO", choices=LOG_LEVELS, type=str.upper)
    parser.add_argument("--hostname", help="Celery node name (default: gpu-<model>@<host>)")


def run(args: argparse.Namespace) -> int:
    """Validate settings and the model, then run the worker until it is stopped."""
    from masactrl_jobs.catalog import CatalogError, UnknownModel, load_catalog
    from masactrl_jobs.settings import ConfigurationError, load_settings
    from worker.config import WorkerSettings

    logging.basicConfig(
        level=args.loglevel,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = load_settings(WorkerSettings)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")

    if args.webhooks:
        from worker.main import run_webhook_worker

        return run_webhook_worker(
            settings, concurrency=args.concurrency, loglevel=args.loglevel, hostname=args.hostname
        )

    name = args.model or settings.model
    if not name:
        raise UsageError(
            "say which model to serve: --model NAME (or MASACTRL_MODEL), or --webhooks"
        )
    try:
        entry = load_catalog(settings).get(name)
    except (CatalogError, UnknownModel) as exc:
        raise UsageError(str(exc)) from None
    from masactrl_core.errors import ModelLoadError
    from worker.main import run_gpu_worker

    try:
        return run_gpu_worker(settings, entry, loglevel=args.loglevel, hostname=args.hostname)
    except FileNotFoundError as exc:
        raise UsageError(f"model {name}: {exc}") from None
    except ModelLoadError as exc:
        # Found before Celery starts. Exit 1, as when the model fails to load in the pool child
        # (docs/workers.md): the catalog, not the command line, names the missing source.
        print(f"masactrl worker: error: {exc}", file=sys.stderr)
        return 1
