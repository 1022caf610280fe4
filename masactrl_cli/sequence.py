"""``masactrl sequence``: one source, a series of condition frames, a consistent clip.

The frames come from ``--frame`` files (in the given order), a ``--frames`` folder (sorted by
name) or a ``--video`` sampled at ``--fps`` up to ``--max-frames``; ``engine.sequence`` turns
them into one frame each that keeps the source's content. The outputs are ``source.png``,
``frame_000.png`` ..., ``sequence.mp4``, ``sequence.webp`` and, written last, ``run.json``.

Engine loading, control and size resolution, condition loading, progress bars and run.json
writing are ``masactrl synthesize``'s (``masactrl_cli.generate``); this module adds the frame
sources, the animation and the sequence's own checks. Every bad input is a UsageError.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from masactrl_cli.errors import UsageError
from masactrl_cli.generate import (
    ProgressBars,
    add_output_options,
    add_sampling_options,
    check_model,
    load_condition,
    load_engine,
    load_image,
    one_line,
    prepare_out_dir,
    prompt_warnings,
    quiet_libraries,
    resolve_run,
    versions,
    write_json,
)
from masactrl_cli.options import (
    add_condition_options,
    add_model_options,
    condition_options,
    positive_int,
)

# The output rate of image frames when --fps is not given (a video keeps its own rate).
DEFAULT_FPS = 8.0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    """The sequence's source, target, frame source, condition and sampling options."""
    add_model_options(parser)
    source = parser.add_argument_group(
        "source", "a prompt to synthesize, or a photo to invert (with an optional prompt)"
    )
    source.add_argument("--source-prompt", help="prompt of the source (with --image: describes it)")
    source.add_argument("--image", type=Path, help="a real photo as the source, inverted")
    source.add_argument(
        "--anchor-source",
        action="store_true",
        help="with --image: reset the source latent to the inversion's latent at every step",
    )
    parser.add_argument(
        "--target-prompt",
        dest="target_prompts",
        action="append",
        required=True,
        metavar="PROMPT",
        help="the frames' prompt; or repeat it once per frame",
    )
    frames = parser.add_argument_group(
        "condition frames", "exactly one of --frame, --frames, --video"
    )
    sources = frames.add_mutually_exclusive_group(required=True)
    sources.add_argument(
        "--frame",
        dest="frame_files",
        action="append",
        type=Path,
        metavar="FILE",
        help="a condition frame; repeat in playing order",
    )
    sources.add_argument(
        "--frames", dest="frame_dir", type=Path, metavar="DIR", help="a folder of frames, by name"
    )
    sources.add_argument("--video", type=Path, metavar="FILE", help="a video to take frames from")
    frames.add_argument(
        "--fps",
        type=_positive_float,
        help="frames a second: the rate --video is sampled at (default: every frame) and the "
        f"animation's rate (default: the video's, or {DEFAULT_FPS:g} for image frames)",
    )
    frames.add_argument(
        "--max-frames", type=positive_int, help="with --video: take at most this many frames"
    )
    add_condition_options(parser, source_image=False, images=False)
    add_sampling_options(parser)
    add_output_options(parser)


# --- checks that need no torch ---------------------------------------------------------------


@dataclass(frozen=True)
class Frames:
    """The condition frames as read, where they came from, and the animation's rate."""

    images: list[Any]
    fps: float
    record: dict[str, Any]


def _check_source(args: argparse.Namespace) -> None:
    if args.image is None and args.source_prompt is None:
        raise UsageError("give the source: --source-prompt, or --image (with an optional prompt)")
    if args.anchor_source and args.image is None:
        raise UsageError("--anchor-source needs --image: only an inverted photo can anchor")
    if args.video is None and args.max_frames is not None:
        raise UsageError("--max-frames applies only to --video")


def read_condition_frames(args: argparse.Namespace, limit: int) -> Frames:
    """The frames of ``--frame``, ``--frames`` or ``--video``, at most ``limit`` of them."""
    from masactrl_jobs.media import (
        MediaError,
        OverBudget,
        VideoBudget,
        common_size,
        decode_video,
        probe_video,
        read_frame_dir,
        read_frames,
    )

    try:
        if args.video is not None:
            # The same budget a worker decodes under: refused before a frame is decoded.
            budget = VideoBudget.defaults(limit)
            info = probe_video(args.video, count_up_to=args.max_frames or limit)
            try:
                images = decode_video(
                    args.video, budget=budget, fps=args.fps, max_frames=args.max_frames
                )
            except OverBudget as exc:
                if exc.type != "too_many_frames":
                    raise
                raise UsageError(
                    f"a sequence takes at most {limit} frames and the video gives more "
                    "(use --max-frames or a lower --fps)"
                ) from None
            fps = args.fps or info.fps or DEFAULT_FPS
            record: dict[str, Any] = {
                "video": str(args.video),
                "sha256": hashlib.sha256(args.video.read_bytes()).hexdigest(),
                "video_fps": info.fps,
                "sampling_fps": args.fps,
                "max_frames": args.max_frames,
            }
        elif args.frame_dir is not None:
            images = read_frame_dir(args.frame_dir)
            fps, record = args.fps or DEFAULT_FPS, {"folder": str(args.frame_dir)}
        else:
            images = read_frames(args.frame_files)
            fps = args.fps or DEFAULT_FPS
            record = {"files": [str(path) for path in args.frame_files]}
        if len(images) > limit:
            raise UsageError(f"a sequence takes at most {limit} frames, got {len(images)}")
        # The engine resizes every frame to the run's size; different sizes need one said.
        if args.width is None and args.height is None:
            common_size(images)
    except MediaError as exc:
        raise UsageError(one_line(exc)) from None
    return Frames(images, fps, {**record, "count": len(images)})


# --- running ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Validate, read the frames, load the engine, run the sequence, write the outputs."""
    started = time.perf_counter()
    check_model(args.model)
    _check_source(args)
    photo = None if args.image is None else load_image(args.image)
    quiet_libraries()  # before the engine module brings in diffusers and transformers
    from masactrl_core.engine import EngineOptions

    frames = read_condition_frames(args, EngineOptions().max_sequence_frames)
    count = len(frames.images)
    prompts = list(args.target_prompts)  # one for all frames or one each: the engine checks
    condition = condition_options(args, targets=count, editing=photo is not None, frames=count)
    if condition is None:
        raise UsageError("a sequence needs --condition-model (the frames are its layouts)")
    check_model(condition.model, "--condition-model", marker="config.json")
    prepare_out_dir(args.out)
    read_seconds = time.perf_counter() - started

    engine = load_engine(args)
    load_seconds = time.perf_counter() - started - read_seconds
    width, height, start_step, start_layer = resolve_run(args, engine)
    warnings = prompt_warnings(args, engine)
    engine_condition = load_condition(engine, condition, frames.images, None)

    from masactrl_core import ControlConfig, InvalidInput

    out: Path = args.out
    frame_names = [f"frame_{k:03d}.png" for k in range(count)]

    def save_frame(index: int, image: Any) -> None:
        # Written as each frame is decoded, so a long run shows its frames as they come.
        image.save(out / frame_names[index])

    source_prompt = args.source_prompt or ""
    progress = ProgressBars(enabled=not args.quiet)
    try:
        result = engine.sequence(
            source_prompt,
            prompts,
            engine_condition,
            image=photo,
            anchor_source=args.anchor_source,
            seed=args.seed,
            steps=args.steps,
            guidance_scale=args.guidance,
            negative_prompt=args.negative_prompt,
            width=width,
            height=height,
            control=ControlConfig(start_step=start_step, start_layer=start_layer),
            progress=progress,
            on_frame=save_frame,
        )
    except InvalidInput as exc:
        raise UsageError(one_line(exc)) from None
    finally:
        progress.close()

    from masactrl_jobs.media import encode_mp4, encode_webp

    encode_started = time.perf_counter()
    result.source.save(out / "source.png")
    (out / "sequence.mp4").write_bytes(encode_mp4(result.frames, frames.fps))
    (out / "sequence.webp").write_bytes(encode_webp(result.frames, frames.fps))
    encode_seconds = time.perf_counter() - encode_started

    stats = result.stats
    condition_record = {
        key: value
        for key, value in condition.record().items()
        if key not in ("images", "source_image")  # the frames are recorded on their own
    }
    record: dict[str, Any] = {
        "command": args.command,
        "model": args.model,
        "model_config": args.model_config,
        "loras": [{"name": n, "weight": w} for n, w in engine.loras.active.items()],
        "family": engine.family,
        "block_count": engine.block_count,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "source_prompt": source_prompt,
        "image": None
        if photo is None
        else {
            "path": str(args.image),
            "sha256": hashlib.sha256(args.image.read_bytes()).hexdigest(),
            "size": list(photo.size),
        },
        "anchor_source": args.anchor_source,
        "target_prompts": prompts,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "start_step": start_step,
        "start_layer": start_layer,
        "width": result.source.size[0],
        "height": result.source.size[1],
        "requested_width": args.width,
        "requested_height": args.height,
        "condition": condition_record,
        "frames": frames.record,
        "frame_count": len(result.frames),
        "fps": frames.fps,
        "unet_image_evals": stats.unet_image_evals,
        "condition_evals": stats.condition_evals,
        "peak_memory_bytes": stats.peak_memory_bytes,
        "timings": {
            "read_seconds": round(read_seconds, 4),
            "load_seconds": round(load_seconds, 4),
            "inversion_seconds": round(stats.inversion_seconds or 0.0, 4),
            "denoise_seconds": round(stats.denoise_seconds or 0.0, 4),
            "encode_seconds": round(encode_seconds, 4),
            "total_seconds": round(time.perf_counter() - started, 4),
        },
        "outputs": {
            "source": "source.png",
            "frames": frame_names,
            "mp4": "sequence.mp4",
            "webp": "sequence.webp",
        },
        "warnings": warnings,
        "versions": versions(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / "run.json", record)
    print(
        f"wrote {out / 'source.png'}, {count} frame(s), {out / 'sequence.mp4'}, "
        f"{out / 'sequence.webp'} and {out / 'run.json'}"
    )
    return 0
