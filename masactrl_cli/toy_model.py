"""``masactrl toy-model train OUT``: train the toy-world checkpoint (see masactrl_toy.train).

Shows a progress bar with the loss, writes sample grids to OUT/samples as it goes, and saves a
diffusers folder that ``masactrl synthesize --model OUT`` loads like any SD1.x checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from masactrl_cli.errors import UsageError

# The step budget models/toy-shapes was trained with (1,280 VAE + 5,120 UNet steps).
DEFAULT_STEPS = 6400


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of ``toy-model``: one action, ``train``, for now."""
    parser.add_argument("action", choices=("train",), help="what to do (train a checkpoint)")
    parser.add_argument("out_dir", metavar="OUT", type=Path, help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data (default 0)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=60.0,
        help="time limit: training stops there even before --steps (default 60)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"VAE + UNet steps (default {DEFAULT_STEPS}: the committed models/toy-shapes, "
        "about 45 min on one core of a 2-core VM); finished within --minutes, reproducible",
    )
    parser.add_argument(
        "--size", type=int, default=32, help="image size in pixels, a multiple of 16 (default 32)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: machines are shared)"
    )


def run(args: argparse.Namespace) -> int:
    """Train, save, and print where the checkpoint and its sample grid are."""
    out: Path = args.out_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if args.minutes <= 0:
        raise UsageError(f"--minutes must be positive, got {args.minutes}")
    if args.steps < 2:
        raise UsageError(
            f"--steps must be at least 2 (one for the VAE, one for the UNet), got {args.steps}"
        )
    if args.size < 16 or args.size % 16:
        raise UsageError(f"--size must be a positive multiple of 16, got {args.size}")
    import torch
    from tqdm import tqdm

    from masactrl_cli.generate import quiet_libraries
    from masactrl_toy.train import ToyConfig, train

    quiet_libraries()
    torch.set_num_threads(args.threads)
    bars: dict[str, Any] = {}

    def progress(phase: str, step: int, total: int, loss: float) -> None:
        bar = bars.get(phase)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[phase] = tqdm(total=total or None, desc=phase, unit="step")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    try:
        result = train(
            out,
            seed=args.seed,
            minutes=args.minutes,
            max_steps=args.steps,
            config=ToyConfig(image_size=args.size),
            progress=progress,
        )
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        for bar in bars.values():
            bar.close()
    print(
        f"toy checkpoint (seed {result.seed}) at {result.path}: {result.vae_steps} VAE and "
        f"{result.unet_steps} UNet steps in {result.seconds / 60:.1f} min; samples in "
        f"{result.path / 'samples'}"
    )
    sys.stdout.flush()
    return 0
