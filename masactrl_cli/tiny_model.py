"""``masactrl tiny-model``: write the offline random-weight checkpoint that tests and demos use."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from masactrl_cli.errors import UsageError


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of ``tiny-model``."""
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--family", default="sd", choices=("sd", "sdxl"), help="model family (default sd)"
    )


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint and print what it is (path, native size) on stdout."""
    from masactrl_cli.generate import quiet_libraries

    quiet_libraries()
    from masactrl_core.tiny import tiny_checkpoint_info, write_tiny_checkpoint

    out: Path = args.out_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    try:
        path = write_tiny_checkpoint(out, seed=args.seed, family=args.family)
    except NotImplementedError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(tiny_checkpoint_info(path, seed=args.seed, family=args.family).describe())
    sys.stdout.flush()
    return 0
