"""Command-line options shared by the subcommands (torch-free)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masactrl_cli.errors import UsageError
from masactrl_jobs.control import PREPROCESSINGS, condition_problems

__all__ = [
    "LoraSpec",
    "add_lora_option",
    "add_model_options",
    "lora_spec",
    "ConditionOptions",
    "MaskOptions",
    "add_condition_options",
    "add_control_options",
    "add_mask_options",
    "condition_options",
    "mask_options",
    "non_negative_int",
    "positive_int",
]


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora``: what names the adapter (a file, folder, hub id or catalog name) and its
    weight (None: 1 for a file, the catalog's weight for a name)."""

    name: str
    weight: float | None

    def record(self) -> dict[str, object]:
        return {"name": self.name, "weight": self.weight}


def lora_spec(text: str) -> LoraSpec:
    """``NAME`` or ``NAME:WEIGHT``; a suffix that is not a number stays part of the name."""
    name, colon, weight = text.rpartition(":")
    if colon and name:
        try:
            return LoraSpec(name, float(weight))
        except ValueError:
            pass
    return LoraSpec(text, None)


def add_lora_option(parser: argparse.ArgumentParser, what: str) -> None:
    """The repeatable ``--lora`` option; ``what`` says what names an adapter here."""
    parser.add_argument(
        "--lora",
        dest="loras",
        action="append",
        type=lora_spec,
        default=[],
        metavar="NAME[:WEIGHT]",
        help=f"a LoRA adapter ({what}) and its weight; repeat for up to 4",
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model`` (a folder, hub id or one checkpoint file), its single-file options and
    ``--lora``, for the commands that run the engine here."""
    parser.add_argument(
        "--model",
        required=True,
        help="hub id, local diffusers folder or single-file checkpoint (.safetensors)",
    )
    single = parser.add_argument_group("single-file checkpoints (--model FILE.safetensors)")
    single.add_argument(
        "--model-config",
        metavar="DIR_OR_ID",
        help="diffusers config folder (offline) or hub id for the file's components; for a "
        "FLUX.1 or SD3 transformer file, a complete folder (its other components' weights) "
        "(default: the family's reference repository, from the Hugging Face cache)",
    )
    single.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        help="declare the file's prediction type (default: detected, else the config's)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle weights (.ckpt/.bin: a single file, a folder's or a LoRA's); they can "
        "run arbitrary code while they load (default: .safetensors only)",
    )
    add_lora_option(parser, "a .safetensors file, a folder holding one, or a hub id")


def add_control_options(parser: argparse.ArgumentParser, *, start_step_help: str) -> None:
    """``--start-step`` or ``--no-control`` (exclusive), and ``--start-layer``."""
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--start-step", type=non_negative_int, help=start_step_help)
    control.add_argument(
        "--no-control",
        action="store_true",
        help="run without mutual self-attention (as --start-step equal to --steps): the plain "
        "model's images, for a side-by-side",
    )
    parser.add_argument(
        "--start-layer",
        type=non_negative_int,
        help="first self-attention block with mutual self-attention, in execution order "
        "(default: the model's: the paper's 10 of 16 kept at the same depth, so 44 of SDXL's "
        "70 and 4 of a 7-block model)",
    )


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


def rfc3339(text: str) -> str:
    """An RFC 3339 time with its offset, e.g. 2026-12-07T18:00:00Z."""
    from datetime import datetime

    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a time zone offset (Z or +01:00)")
    return text


def add_queue_options(parser: argparse.ArgumentParser) -> None:
    """``--priority``, ``--start-by`` and ``--max-queue-seconds``: where a job stands in its
    model's queue."""
    queue = parser.add_argument_group("queue (see the API guide's queue policy)")
    queue.add_argument(
        "--priority",
        type=_integer,
        help="higher starts first among your own queued jobs (default 0; your key's range)",
    )
    deadline = queue.add_mutually_exclusive_group()
    deadline.add_argument(
        "--start-by",
        type=rfc3339,
        metavar="TIME",
        help="RFC 3339 time: not started by then, the job ends `expired` and never runs",
    )
    deadline.add_argument(
        "--max-queue-seconds",
        type=positive_int,
        metavar="N",
        help="not started within N seconds, the job ends `expired`",
    )


def queue_options(args: argparse.Namespace) -> dict[str, Any]:
    """The client's keyword arguments for ``add_queue_options``' flags."""
    return {
        "priority": args.priority,
        "start_by": args.start_by,
        "max_queue_seconds": args.max_queue_seconds,
    }


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


def add_condition_options(
    parser: argparse.ArgumentParser,
    *,
    source_image: bool,
    model_help: str = "diffusers ControlNetModel or T2IAdapter (local folder or hub id)",
    thresholds: bool = True,
    images: bool = True,
) -> argparse._ArgumentGroup:
    """``--condition-*`` options: a ControlNet/T2I-Adapter and its images, window and scale.

    ``source_image`` documents ``--source-condition-image`` (synthesis); an edit still accepts
    the flag so that its misuse is reported in a sentence rather than as an unknown option.
    ``thresholds`` adds ``--canny-low``/``--canny-high`` (where canny runs locally).
    ``images=False`` leaves out both image flags, for a command whose condition images come
    from elsewhere (a sequence's frames).
    """
    group = parser.add_argument_group(
        "layout condition", "a ControlNet or T2I-Adapter laying out the targets"
    )
    group.add_argument(
        "--condition-model",
        metavar="PATH_OR_ID" if thresholds else "NAME",
        help=model_help,
    )
    if images:
        group.add_argument(
            "--condition-image",
            dest="condition_images",
            action="append",
            type=Path,
            default=[],
            metavar="FILE",
            help="condition image (edge, pose or depth map); repeat per target, or give one "
            "for all",
        )
        group.add_argument(
            "--source-condition-image",
            type=Path,
            metavar="FILE",
            help="condition image of the source too" if source_image else argparse.SUPPRESS,
        )
    group.add_argument(
        "--condition-scale", type=float, help="weight of the condition's residuals (default 1.0)"
    )
    group.add_argument(
        "--condition-start",
        type=float,
        help="fraction of the steps at which the condition starts (default 0.0)",
    )
    group.add_argument(
        "--condition-end",
        type=float,
        help="fraction of the steps at which the condition ends (default 1.0)",
    )
    group.add_argument(
        "--condition-preprocess",
        choices=PREPROCESSINGS,
        help="make the condition images from ordinary photos first: canny = edge map "
        "(default none: the images are maps already)",
    )
    if thresholds:
        group.add_argument(
            "--canny-low", type=non_negative_int, help="canny's lower threshold (default 100)"
        )
        group.add_argument(
            "--canny-high", type=non_negative_int, help="canny's upper threshold (default 200)"
        )
    return group


@dataclass(frozen=True)
class ConditionOptions:
    """The condition options, checked; the images are still paths."""

    model: str
    images: list[Path]
    source_image: Path | None
    scale: float
    start: float
    end: float
    preprocess: str
    canny_low: int
    canny_high: int

    def record(self) -> dict[str, object]:
        """The options as run.json keeps them."""
        return {
            "model": self.model,
            "images": [str(path) for path in self.images],
            "source_image": None if self.source_image is None else str(self.source_image),
            "scale": self.scale,
            "start": self.start,
            "end": self.end,
            "preprocess": self.preprocess,
            **(
                {"canny_low": self.canny_low, "canny_high": self.canny_high}
                if self.preprocess == "canny"
                else {}
            ),
        }


_CONDITION_FLAGS = {
    "condition_images": "--condition-image",
    "source_condition_image": "--source-condition-image",
    "condition_scale": "--condition-scale",
    "condition_start": "--condition-start",
    "condition_end": "--condition-end",
    "condition_preprocess": "--condition-preprocess",
    "canny_low": "--canny-low",
    "canny_high": "--canny-high",
}
_CONDITION_FIELD_FLAGS = {
    "images": "--condition-image",
    "source_image": "--source-condition-image",
    "scale": "--condition-scale",
    "start": "--condition-start",
    "end": "--condition-end",
    "preprocess": "--condition-preprocess",
}


def condition_options(
    args: argparse.Namespace, *, targets: int, editing: bool, frames: int | None = None
) -> ConditionOptions | None:
    """The checked condition options of ``args`` for ``targets`` prompts, or ``None`` if unset.

    ``frames`` is the number of condition images that come from elsewhere (a sequence's
    frames) rather than from ``--condition-image``; the options then hold no image paths.
    """
    source_condition_image = getattr(args, "source_condition_image", None)
    condition_images = list(getattr(args, "condition_images", None) or [])
    if editing and source_condition_image is not None:
        raise UsageError(
            "--source-condition-image applies only to synthesize: an edit's source is the "
            "inverted photo"
        )
    given = [
        flag
        for dest, flag in _CONDITION_FLAGS.items()
        if getattr(args, dest, None) not in (None, [])
    ]
    canny_low, canny_high = getattr(args, "canny_low", None), getattr(args, "canny_high", None)
    if args.condition_model is None:
        if given:
            raise UsageError(f"{given[0]} needs --condition-model")
        return None
    if frames is None and not condition_images:
        raise UsageError("--condition-model needs at least one --condition-image")
    preprocess = args.condition_preprocess or "none"
    if preprocess != "canny" and (canny_low is not None or canny_high is not None):
        raise UsageError("--canny-low/--canny-high apply only to --condition-preprocess canny")
    options = ConditionOptions(
        model=args.condition_model,
        images=condition_images,
        source_image=source_condition_image,
        scale=1.0 if args.condition_scale is None else args.condition_scale,
        start=0.0 if args.condition_start is None else args.condition_start,
        end=1.0 if args.condition_end is None else args.condition_end,
        preprocess=preprocess,
        canny_low=100 if canny_low is None else canny_low,
        canny_high=200 if canny_high is None else canny_high,
    )
    problems = condition_problems(
        targets=targets,
        images=len(options.images) if frames is None else frames,
        has_source_image=options.source_image is not None,
        editing=editing,
        scale=options.scale,
        start=options.start,
        end=options.end,
        preprocess=options.preprocess,
    )
    if problems:
        problem = problems[0]
        flag = _CONDITION_FIELD_FLAGS.get(str(problem.field[-1]), "--condition-model")
        raise UsageError(f"{flag}: {problem.message}")
    if options.canny_low > options.canny_high:
        raise UsageError(
            f"--canny-low ({options.canny_low}) must not exceed --canny-high ({options.canny_high})"
        )
    return options
