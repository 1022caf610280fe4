"""``masactrl synthesize`` and ``masactrl edit``: run the engine once and write PNGs plus run.json.

Cheap checks (files, model folder) run before torch is imported so that bad input fails in
milliseconds; everything the engine rejects arrives as ``InvalidInput`` and becomes a UsageError.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from masactrl_cli.errors import UsageError
from masactrl_cli.options import (
    ConditionOptions,
    add_condition_options,
    add_control_options,
    add_mask_options,
    add_model_options,
    condition_options,
    mask_options,
    non_negative_int,
    positive_int,
)
from masactrl_jobs.catalog import CatalogError, ModelEntry, checkpoint_entry, is_single_file
from masactrl_jobs.control import InvalidParameters, resolve_control, resolve_size
from masactrl_jobs.schema import ControlParams
from masactrl_jobs.shape import ModelShape

DTYPES = ("float32", "float16", "bfloat16")


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Negative prompt, seed, steps, guidance and the control's start step and layer."""
    parser.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="noise seed (default 0)")
    parser.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)"
    )
    add_control_options(
        parser,
        start_step_help="first denoising step with mutual self-attention (default: the model's, "
        "4); equal to --steps runs without the control",
    )


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """Size, device, dtype, output folder and ``--quiet``."""
    parser.add_argument("--width", type=positive_int, help="image width (default: model's)")
    parser.add_argument("--height", type=positive_int, help="image height (default: model's)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="weights dtype (default: float16 on GPU, else float32)"
    )
    parser.add_argument(
        "--offload",
        action="store_true",
        help="each model component on the device only while it runs (model CPU offload): "
        "slower, for a GPU that cannot hold the whole model (FLUX.1 [dev] on 40-48 GB)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments shared by ``synthesize`` and ``edit`` (``edit`` adds ``--image``)."""
    add_model_options(parser)
    if command == "edit":
        parser.add_argument("--image", required=True, type=Path, help="the real image to edit")
        parser.add_argument(
            "--source-prompt", default="", help="prompt describing the image (default empty)"
        )
    else:
        parser.add_argument("--source-prompt", required=True, help="prompt of the source image")
    parser.add_argument(
        "--target-prompt",
        dest="target_prompts",
        action="append",
        required=True,
        metavar="PROMPT",
        help="a target prompt; repeat for several targets",
    )
    add_sampling_options(parser)
    if command == "edit":
        parser.add_argument(
            "--inversion-guidance",
            type=float,
            default=1.0,
            help="guidance scale of the DDIM inversion (default 1.0: unguided)",
        )
        parser.add_argument(
            "--anchor-source",
            action="store_true",
            help="reset the source latent to the inversion's latent at every step",
        )
    masks = add_mask_options(parser, "images")
    masks.add_argument(
        "--save-masks", action="store_true", help="also write the masks used as mask_*.png"
    )
    add_condition_options(parser, source_image=command == "synthesize")
    add_output_options(parser)


# --- checks that need no torch ---------------------------------------------------------------


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one line of at most ``limit`` characters, for a UsageError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model(model: str, flag: str = "--model", marker: str = "model_index.json") -> None:
    """Refuse a ``--model`` that cannot be had (a missing path, a folder that is no model, a hub
    id offline and not cached) in one line, before torch is imported: see masactrl_core.sources.
    """
    from masactrl_core.errors import ModelLoadError
    from masactrl_core.sources import locate_model

    try:
        locate_model(model, flag, marker)
    except ModelLoadError as exc:
        raise UsageError(one_line(exc)) from None


def load_image(path: Path, mode: str = "RGB", what: str = "image file") -> Any:
    """Open an image file in ``mode``, or raise a UsageError that says what is wrong with it."""
    from masactrl_jobs.media import MediaError, open_image

    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not an image file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read {what} {path}: permission denied")
    try:
        # Its size is checked before its pixels are decoded, as the service checks an upload.
        return open_image(path, what=what, mode=mode)
    except MediaError as exc:
        raise UsageError(one_line(exc)) from None


def read_masks(args: argparse.Namespace) -> dict[str, Any] | None:
    """The mask options as MaskConfig keyword arguments (files read, grayscale), or ``None``."""
    masks = mask_options(args)
    if masks is not None and masks.regions:
        regions = [
            (
                load_image(source, "L", f"source mask {k}"),
                load_image(target, "L", f"target mask {k}"),
            )
            for k, (source, target) in enumerate(masks.regions)
        ]
        return {"regions": regions}
    if masks is not None and masks.words is not None:  # mask_options gives regions or words
        source_word, target_word = masks.words
        threshold = 0.1 if masks.threshold is None else masks.threshold
        return {"source_word": source_word, "target_word": target_word, "threshold": threshold}
    if args.save_masks:
        raise UsageError("--save-masks needs --source-mask/--target-mask or --mask-word")
    return None


def read_condition_images(options: ConditionOptions) -> tuple[list[Any], Any]:
    """The condition images (targets', then the source's or ``None``) read as RGB."""
    images = [
        load_image(path, "RGB", f"condition image {k}") for k, path in enumerate(options.images)
    ]
    source = (
        None
        if options.source_image is None
        else load_image(options.source_image, "RGB", "source condition image")
    )
    return images, source


def load_condition(engine: Any, options: ConditionOptions, images: list[Any], source: Any) -> Any:
    """The engine's ``Condition``: the model loaded and checked, canny applied when asked."""
    from masactrl_core import InvalidInput, ModelLoadError
    from masactrl_core.conditions import Condition

    try:
        model = engine.load_condition_model(options.model)
    except (InvalidInput, ModelLoadError) as exc:
        raise UsageError(one_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a broken download or file: reported, not dumped
        raise UsageError(
            f"cannot load condition model {options.model}: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    if options.preprocess == "canny":
        from masactrl_core.canny import canny

        def edges(image: Any) -> Any:
            return canny(image, low_threshold=options.canny_low, high_threshold=options.canny_high)

        images = [edges(image) for image in images]
        source = None if source is None else edges(source)
    return Condition(
        model,
        images,
        source_image=source,
        scale=options.scale,
        start=options.start,
        end=options.end,
    )


def prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out}: {exc.strerror or exc}") from None


def quiet_libraries() -> None:
    """Keep library chatter (load bars, advisory warnings) off stderr; ours is the only bar."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    # huggingface_hub warns about arguments diffusers passes it: the user can do nothing there.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"huggingface_hub\.")
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


# --- progress --------------------------------------------------------------------------------


class ProgressBars:
    """The engine's ``progress(phase, step, total)`` callback drawn as one tqdm bar per phase."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: Any = None
        self._phase: str | None = None

    def __call__(self, phase: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self._bar is None or phase != self._phase or total != self._bar.total:
            self.close()
            self._phase = phase
            self._bar = tqdm(total=total, desc=f"{phase:>7}", unit="step", file=sys.stderr)
        # `step` counts the steps done so far in this phase; never move the bar backwards.
        done = min(step, total)
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --- running ---------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("masactrl-service", "torch", "diffusers", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def write_json(path: Path, data: dict[str, Any]) -> None:
    # Written last and atomically: a run.json next to the PNGs means the run finished.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _mask_record(args: argparse.Namespace, options: dict[str, Any] | None) -> dict[str, Any]:
    if options is None:
        return {"mode": "none"}
    if "regions" in options:
        return {
            "mode": "manual",
            "source": [str(p) for p in args.source_masks],
            "target": [str(p) for p in args.target_masks],
        }
    return {"mode": "word", **options}


def model_entry(model: str, engine: Any) -> ModelEntry:
    """The loaded checkpoint as a catalog entry: its shape as the engine measured it, and the
    control defaults that follow from it (or that its folder's ``masactrl.json`` declares)."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", Path(model.rstrip("/")).name.lower()).strip("-._")
    try:
        entry = checkpoint_entry(name[:63] or "model", model, engine.family)
    except CatalogError as exc:
        raise UsageError(one_line(exc)) from None
    shape = ModelShape.from_description(engine.describe())
    conflicts = entry.shape_conflicts(shape)
    if conflicts:
        raise UsageError(conflicts[0])
    return entry.with_shape(shape)


def prompt_warnings(args: argparse.Namespace, engine: Any) -> list[str]:
    """The engine's warnings about the run's prompts (words outside the vocabulary the model
    declares), each printed on stderr now, before the run, and returned for run.json."""
    prompts = [("--source-prompt", args.source_prompt or "")]
    prompts += [(f"--target-prompt #{k + 1}", p) for k, p in enumerate(args.target_prompts)]
    prompts.append(("--negative-prompt", args.negative_prompt))
    warnings: list[str] = engine.prompt_warnings(prompts)
    for warning in warnings:
        print(f"masactrl {args.command}: warning: {warning}", file=sys.stderr)
    return warnings


def load_engine(args: argparse.Namespace) -> Any:
    """The engine for ``--model``/``--device``/``--dtype``; a load failure is a UsageError."""
    quiet_libraries()
    import torch

    from masactrl_core import InvalidInput, MasaCtrlEngine, ModelLoadError

    dtype = getattr(torch, args.dtype) if args.dtype else None
    single_file = is_single_file(args.model)
    for flag, value in (
        ("--model-config", args.model_config),
        ("--prediction-type", args.prediction_type),
    ):
        if value is not None and not single_file:
            raise UsageError(f"{flag} applies only to a single-file --model (.safetensors)")
    names = [lora.name for lora in args.loras]
    if len(set(names)) < len(names):
        raise UsageError("each --lora may be given once")
    try:
        if single_file:
            engine = MasaCtrlEngine.from_single_file(
                args.model,
                config=args.model_config,
                prediction_type=args.prediction_type,
                allow_pickle=args.allow_pickle,
                device=args.device,
                dtype=dtype,
                offload=args.offload,
            )
        else:
            engine = MasaCtrlEngine.from_pretrained(
                args.model,
                device=args.device,
                dtype=dtype,
                allow_pickle=args.allow_pickle,
                offload=args.offload,
            )
        for lora in args.loras:
            engine.loras.load(lora.name, lora.name, allow_pickle=args.allow_pickle)
        # One run per process: the adapters stay active until it ends.
        engine.loras.activate(
            {lora.name: 1.0 if lora.weight is None else lora.weight for lora in args.loras}
        )
        return engine
    except (InvalidInput, ModelLoadError) as exc:
        raise UsageError(one_line(exc)) from None
    except Exception as exc:  # noqa: BLE001 - e.g. a bad --device: reported, not dumped
        raise UsageError(
            f"cannot load model {args.model}: {type(exc).__name__}: {one_line(exc)}"
        ) from None


def check_features(args: argparse.Namespace, entry: ModelEntry) -> None:
    """Refuse, with the flag, what the model's family does not offer (the gateway's rules:
    ``masactrl_jobs.shape.FAMILY_FEATURES``): a layout condition or a sequence on SD3 or
    FLUX.1, a negative prompt on guidance-distilled FLUX.1."""
    features = entry.features
    family = f"{args.model} is a {entry.family} model, and {features.unavailable}"
    if args.command == "sequence" and not features.sequences:
        raise UsageError(f"--model: {family}")
    if getattr(args, "condition_model", None) is not None and not features.layout_conditions:
        raise UsageError(f"--condition-model: {family}")
    if args.negative_prompt.strip() and not features.negative_prompt:
        raise UsageError(
            f"--negative-prompt: {args.model} is a guidance-distilled {entry.family} model "
            "(--guidance is an input of the model, there are no unconditional rows), so a "
            "negative prompt has no effect; leave it out"
        )


def resolve_run(args: argparse.Namespace, engine: Any) -> tuple[int, int, int, int]:
    """(width, height, start_step, start_layer) by the service's rules, against the loaded
    checkpoint: unset values take its defaults (masactrl_jobs.shape: start step 4, start layer
    at 10/16 of its depth, or what it declares), and what the model cannot run (a size, a
    control, a feature its family lacks) is a UsageError."""
    entry = model_entry(args.model, engine)
    check_features(args, entry)
    requested = ControlParams.model_construct(
        start_step=args.steps if args.no_control else args.start_step,
        start_layer=args.start_layer,
    )
    try:
        width, height = resolve_size(entry, args.width, args.height)
        resolved = resolve_control(entry, requested, args.steps)
    except InvalidParameters as exc:
        raise UsageError(one_line(exc)) from None
    return width, height, resolved.start_step, resolved.start_layer


def run(args: argparse.Namespace) -> int:
    """Validate, load the engine, run one synthesis or edit, write the outputs."""
    started = time.perf_counter()
    check_model(args.model)
    image = load_image(args.image) if args.command == "edit" else None
    mask_options = read_masks(args)
    condition = condition_options(
        args, targets=len(args.target_prompts), editing=args.command == "edit"
    )
    if condition is not None:
        check_model(condition.model, "--condition-model", marker="config.json")
    condition_images = read_condition_images(condition) if condition is not None else None
    prepare_out_dir(args.out)

    engine = load_engine(args)
    load_seconds = time.perf_counter() - started
    width, height, start_step, start_layer = resolve_run(args, engine)
    warnings = prompt_warnings(args, engine)

    from masactrl_core import ControlConfig, InvalidInput, MaskConfig

    engine_condition = (
        None
        if condition is None or condition_images is None
        else load_condition(engine, condition, *condition_images)
    )

    progress = ProgressBars(enabled=not args.quiet)
    options: dict[str, Any] = {
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "negative_prompt": args.negative_prompt,
        "width": width,
        "height": height,
        "progress": progress,
        "masks": None if mask_options is None else MaskConfig(**mask_options),
        "condition": engine_condition,
    }
    try:
        control = ControlConfig(start_step=start_step, start_layer=start_layer)
        if image is None:
            result = engine.synthesize(
                args.source_prompt, args.target_prompts, seed=args.seed, control=control, **options
            )
        else:
            result = engine.edit(
                image,
                args.target_prompts,
                source_prompt=args.source_prompt,
                seed=args.seed,
                control=control,
                inversion_guidance_scale=args.inversion_guidance,
                anchor_source=args.anchor_source,
                **options,
            )
    except InvalidInput as exc:
        raise UsageError(one_line(exc)) from None
    finally:
        progress.close()

    out: Path = args.out
    source_name = "source.png"
    result.source.save(out / source_name)
    target_names = []
    for k, target in enumerate(result.targets):
        target_names.append(f"target_{k}.png")
        target.save(out / target_names[-1])
    mask_names = []
    if args.save_masks and result.masks:
        for name, mask in result.masks.items():
            mask_names.append(f"mask_{name}.png")
            mask.save(out / mask_names[-1])

    stats = result.stats
    width, height = result.source.size
    record: dict[str, Any] = {
        "command": args.command,
        "model": args.model,
        "model_config": args.model_config,
        "loras": [{"name": n, "weight": w} for n, w in engine.loras.active.items()],
        "family": engine.family,
        "block_count": engine.block_count,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "source_prompt": args.source_prompt,
        "target_prompts": list(args.target_prompts),
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "start_step": start_step,
        "start_layer": start_layer,
        "masks": _mask_record(args, mask_options),
        "width": width,
        "height": height,
        "requested_width": args.width,
        "requested_height": args.height,
        "condition": None if condition is None else condition.record(),
        "unet_image_evals": stats.unet_image_evals,
        "condition_evals": stats.condition_evals,
        "peak_memory_bytes": stats.peak_memory_bytes,
        "timings": {
            "load_seconds": round(load_seconds, 4),
            "inversion_seconds": round(stats.inversion_seconds or 0.0, 4),
            "denoise_seconds": round(stats.denoise_seconds or 0.0, 4),
            "total_seconds": round(time.perf_counter() - started, 4),
        },
        "outputs": {"source": source_name, "targets": target_names},
        "warnings": warnings,
        "versions": versions(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if mask_names:
        record["outputs"]["masks"] = mask_names
    if image is not None:
        record["inversion_guidance_scale"] = args.inversion_guidance
        record["anchor_source"] = args.anchor_source
        record["image"] = {
            "path": str(args.image),
            "sha256": hashlib.sha256(args.image.read_bytes()).hexdigest(),
            "size": list(image.size),
        }
    write_json(out / "run.json", record)
    print(f"wrote {out / source_name}, {len(target_names)} target image(s) and {out / 'run.json'}")
    if args.save_masks:
        # Automatic masks exist only where the control ran after a cross-attention map.
        print(
            f"wrote {len(mask_names)} mask(s)"
            if mask_names
            else "no masks to save: the control never ran with masks (check --start-step)"
        )
    return 0
