"""``masactrl serve``: run the HTTP gateway under uvicorn (no torch is imported)."""

from __future__ import annotations

import argparse

from masactrl_cli.errors import UsageError

__all__ = ["add_parser", "configure", "run"]

HELP = "run the HTTP gateway (FastAPI under uvicorn)"


def configure(parser: argparse.ArgumentParser, command: str = "serve") -> None:
    """Add the ``serve`` arguments to ``parser``."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn worker processes (default: %(default)s); each holds its own connections",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="(default: %(default)s)",
    )
    parser.add_argument("--no-access-log", action="store_true", help="do not log each request")
    parser.add_argument(
        "--forwarded-allow-ips",
        default="127.0.0.1",
        help="proxies trusted for X-Forwarded-* headers (default: %(default)s)",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds to let open requests finish on shutdown (default: %(default)s)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on an argparse subparsers object."""
    parser = subparsers.add_parser("serve", help=HELP, description=HELP)
    configure(parser, "serve")
    return parser


def run(args: argparse.Namespace) -> int:
    """Validate the settings (one clear error instead of a worker crash loop), then serve."""
    import uvicorn

    from masactrl_jobs.catalog import CatalogError, load_catalog
    from masactrl_jobs.settings import ConfigurationError, load_settings
    from service.config import GatewaySettings

    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    try:
        load_catalog(load_settings(GatewaySettings))
    except (CatalogError, ConfigurationError) as exc:
        raise UsageError(str(exc)) from None
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        proxy_headers=True,
        forwarded_allow_ips=args.forwarded_allow_ips,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    return 0
