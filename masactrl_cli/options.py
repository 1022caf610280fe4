"""Command-line options shared by the subcommands (torch-free)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from masactrl_cli.errors import UsageError

__all__ = ["MaskOptions", "add_mask_options", "mask_options", "non_negative_int", "positive_int"]


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def add_mask_options(parser: argparse.ArgumentParser, images: str) -> argparse._ArgumentGroup:
    """``--source-mask``/``--target-mask`` pairs, ``--mask-word`` and ``--mask-threshold``."""
    masks = parser.add_argument_group(
        "masks", "mask-guided mutual self-attention (manual region pairs or a word pair)"
    )
    masks.add_argument(
        "--source-mask",
        dest="source_masks",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help=f"a region of the source {images} (white = inside); repeat per region",
    )
    masks.add_argument(
        "--target-mask",
        dest="target_masks",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help=f"the same region in the target {images}, paired with the --source-mask in its place",
    )
    masks.add_argument(
        "--mask-word",
        metavar="SOURCE_WORD:TARGET_WORD",
        help="automatic masks from the cross-attention maps of a word of each prompt",
    )
    masks.add_argument(
        "--mask-threshold",
        type=float,
        help="threshold of the normalized maps for --mask-word (default 0.1)",
    )
    return masks


@dataclass(frozen=True)
class MaskOptions:
    """The mask options, checked: region file pairs, or a word pair (with an optional threshold)."""

    regions: list[tuple[Path, Path]]
    words: tuple[str, str] | None
    threshold: float | None


def mask_options(args: argparse.Namespace) -> MaskOptions | None:
    """The checked mask options of ``args``, or ``None`` when none were given."""
    sources, targets = args.source_masks, args.target_masks
    if len(sources) != len(targets):
        raise UsageError(
            f"give one --target-mask per --source-mask (got {len(sources)} source and "
            f"{len(targets)} target masks)"
        )
    if sources and args.mask_word:
        raise UsageError("give either --source-mask/--target-mask pairs or --mask-word, not both")
    if args.mask_threshold is not None and not args.mask_word:
        raise UsageError("--mask-threshold applies only to --mask-word")
    words = None
    if args.mask_word:
        source_word, colon, target_word = args.mask_word.partition(":")
        if not colon or not source_word.strip() or not target_word.strip():
            raise UsageError(f"--mask-word must be SOURCE_WORD:TARGET_WORD, got {args.mask_word!r}")
        words = (source_word.strip(), target_word.strip())
    if not sources and words is None:
        return None
    return MaskOptions(list(zip(sources, targets, strict=True)), words, args.mask_threshold)
