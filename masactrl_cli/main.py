"""The ``masactrl`` console script.

This module stays torch-free: it knows each subcommand only by name, one-line help and the module
that implements it, and imports that module only when the subcommand is the one being run. So
``masactrl serve`` never pays for (or needs) torch, and ``masactrl --help`` is instant.

A subcommand module provides::

    def configure(parser: argparse.ArgumentParser, command: str) -> None  # add its arguments
    def run(args: argparse.Namespace) -> int                             # exit status

and reports bad input by raising :class:`UsageError`, which becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from masactrl_cli.errors import UsageError

__all__ = ["EXIT_USAGE", "SUBCOMMANDS", "Subcommand", "UsageError", "build_parser", "main"]

EXIT_USAGE = 2


@dataclass(frozen=True)
class Subcommand:
    name: str
    module: str
    help: str


# Later subcommands (serve, worker, client, ...) add a row here and a module of their own.
SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "synthesize",
        "masactrl_cli.generate",
        "consistent synthesis: a source image and one image per target prompt",
    ),
    Subcommand(
        "edit", "masactrl_cli.generate", "real-image editing: invert an image, then edit it"
    ),
    Subcommand(
        "sequence",
        "masactrl_cli.sequence",
        "consistent frames: one source and a series of layouts (pose, edges) as a clip",
    ),
    Subcommand(
        "tiny-model",
        "masactrl_cli.tiny_model",
        "write a small random-weight checkpoint for offline tests and demos",
    ),
    Subcommand(
        "toy-model", "masactrl_cli.toy_model", "train the toy-world checkpoint from scratch"
    ),
    Subcommand("serve", "masactrl_cli.serve", "run the HTTP gateway (FastAPI under uvicorn)"),
    Subcommand(
        "worker",
        "masactrl_cli.worker",
        "run a Celery worker: a GPU worker for one model, or the webhook worker",
    ),
    Subcommand(
        "client", "masactrl_cli.client", "talk to a running gateway: submit, follow, fetch jobs"
    ),
    Subcommand(
        "up",
        "masactrl_cli.stack",
        "start the local stack (Redis, gateway, workers) in the background",
    ),
    Subcommand("down", "masactrl_cli.stack", "stop the processes `masactrl up` started"),
    Subcommand(
        "demo",
        "masactrl_cli.demo",
        "run the service once end to end: an edit and a synthesis through the HTTP API",
    ),
)


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we promise one line, so print only the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _selected(argv: Sequence[str]) -> Subcommand | None:
    # The top-level parser has only flags, so the first positional token names the subcommand.
    first = next((token for token in argv if not token.startswith("-")), None)
    return next((sub for sub in SUBCOMMANDS if sub.name == first), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser, with arguments attached only for the subcommand named in ``argv``."""
    parser = _OneLineParser(
        prog="masactrl",
        description="MasaCtrl (mutual self-attention control) for Stable Diffusion.",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_OneLineParser
    )
    chosen = _selected(argv)
    for sub in SUBCOMMANDS:
        sub_parser = subparsers.add_parser(sub.name, help=sub.help, description=sub.help)
        if sub is chosen:
            importlib.import_module(sub.module).configure(sub_parser, sub.name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns (and as a console script exits with) its status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help and on usage errors; callers of main() get a status instead.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    module = importlib.import_module(next(s.module for s in SUBCOMMANDS if s.name == args.command))
    try:
        return module.run(args)
    except UsageError as exc:
        print(f"masactrl {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"masactrl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
