"""``masactrl client``: submit, follow, fetch and cancel jobs on a running gateway.

::

    masactrl client edit --image cat.png --target-prompt "a cat wearing a hat" --wait --out out/
    masactrl client synthesize --source-prompt "a cat" --target-prompt "a dog" --steps 20
    masactrl client sequence --source-prompt "a knight" --target-prompt "a knight dancing" \
        --condition-model openpose --frames poses/ --out clip/   # frames, sequence.mp4/.webp
    masactrl client synthesize ... --previews --out out/   # live previews kept in out/preview/
    masactrl client wait JOB_ID --out out/      # progress bars from the SSE stream, then the PNGs
    masactrl client get JOB_ID | cancel JOB_ID | models

The gateway is ``--api-url`` or ``MASACTRL_API_URL`` (default http://127.0.0.1:8000); the key is
``--api-key``, ``MASACTRL_API_KEY`` or ./var/dev-api-key (written by ``masactrl up``). A 4xx
answer is one line with exit status 2; a 5xx or an unreachable gateway is one line with exit 1.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from masactrl_cli.errors import UsageError
from masactrl_cli.options import (
    add_condition_options,
    add_control_options,
    add_lora_option,
    add_mask_options,
    add_queue_options,
    condition_options,
    mask_options,
    non_negative_int,
    positive_int,
    queue_options,
)

if TYPE_CHECKING:  # imported lazily at run time: `--help` stays instant
    from masactrl_cli.http_client import Event, MasaCtrlClient

EXIT_FAILED = 1
WEBHOOK_EVENTS = ("started", "progress", "completed")


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gateway")
    group.add_argument(
        "--api-url", help="gateway base URL (default: MASACTRL_API_URL or http://127.0.0.1:8000)"
    )
    group.add_argument(
        "--api-key", help="API key (default: MASACTRL_API_KEY, else ./var/dev-api-key)"
    )
    group.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per request (default %(default)s)"
    )


def _follow_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="save the result images (and job.json) here"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--json", action="store_true", help="print the final job object instead of file paths"
    )


def _job_options(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "edit":
        parser.add_argument(
            "--image",
            required=True,
            help="image file to edit (or a data:, https:// or s3:// URL the gateway reads)",
        )
        parser.add_argument("--source-prompt", help="prompt describing the image (default empty)")
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
    parser.add_argument("--negative-prompt", help="negative prompt (default empty)")
    parser.add_argument("--model", help="catalog model name (default: the catalog's default)")
    add_lora_option(parser, "a name the model lists in `masactrl client models`")
    parser.add_argument("--seed", type=non_negative_int, help="noise seed (default: random)")
    parser.add_argument("--steps", type=positive_int, help="DDIM steps (default 50)")
    parser.add_argument(
        "--guidance-scale",
        "--guidance",
        dest="guidance_scale",
        type=float,
        help="classifier-free guidance scale (default 7.5)",
    )
    parser.add_argument("--width", type=positive_int, help="default: the model's native size")
    parser.add_argument("--height", type=positive_int, help="default: the model's native size")
    add_control_options(
        parser, start_step_help="first controlled step (default: model's; = steps: no control)"
    )
    add_mask_options(parser, "image")
    add_condition_options(
        parser,
        source_image=command == "synthesize",
        model_help="a condition model name the model lists in `masactrl client models`",
        thresholds=False,
    )
    if command == "edit":
        parser.add_argument(
            "--anchor-source",
            action="store_true",
            help="reset the source latent to the inversion's latent at every step",
        )
    _previews_option(parser)
    parser.add_argument("--webhook", metavar="URL", help="POST signed job events to this URL")
    parser.add_argument(
        "--webhook-event",
        dest="webhook_events",
        action="append",
        choices=WEBHOOK_EVENTS,
        help="events to send (repeatable; default all)",
    )
    add_queue_options(parser)
    parser.add_argument("--idempotency-key", help="make retries of this submission safe")
    parser.add_argument(
        "--wait", action="store_true", help="follow the job to its end (implied by --out)"
    )


def _previews_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--previews",
        action="store_true",
        help="ask for live previews; with --out the latest is kept in OUT/preview/",
    )


def _sequence_options(parser: argparse.ArgumentParser) -> None:
    """The flags of ``masactrl sequence`` that make sense over HTTP."""
    source = parser.add_argument_group("source (a prompt, or an image that is inverted)")
    source.add_argument("--source-prompt", help="prompt of the source (needed without --image)")
    source.add_argument("--image", help="a photo as the source: a file or a URL")
    source.add_argument(
        "--anchor-source",
        action="store_true",
        help="with --image: reset the source latent to the inversion's at every step",
    )
    parser.add_argument(
        "--target-prompt",
        dest="target_prompts",
        action="append",
        required=True,
        help="target prompt: once for every frame, or once per frame in order",
    )
    layouts = parser.add_argument_group("condition frames (one of --frame, --frames, --video)")
    layouts.add_argument("--condition-model", required=True, help="a condition model name")
    given = layouts.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--frame", dest="frame_files", action="append", help="a frame file (repeat, in order)"
    )
    given.add_argument("--frames", type=Path, help="a folder of frames, read in name order")
    given.add_argument("--video", help="a video file or URL whose frames are the layouts")
    layouts.add_argument("--fps", type=float, help="with --video: frames taken per second")
    layouts.add_argument("--max-frames", type=positive_int, help="with --video: at most K frames")
    layouts.add_argument(
        "--condition-preprocess", choices=["none", "canny"], help="canny for ordinary video"
    )
    layouts.add_argument("--condition-scale", type=float, help="condition weight (default 1)")
    layouts.add_argument("--condition-start", type=float, help="fraction where it starts (0)")
    layouts.add_argument("--condition-end", type=float, help="fraction where it ends (1)")
    parser.add_argument(
        "--animation-fps", type=float, help="frame rate of sequence.mp4/.webp (default 8)"
    )
    parser.add_argument("--negative-prompt", help="negative prompt (default empty)")
    parser.add_argument("--model", help="catalog model name (default: the catalog's default)")
    add_lora_option(parser, "a name the model lists in `masactrl client models`")
    parser.add_argument("--seed", type=non_negative_int, help="noise seed (default: random)")
    parser.add_argument("--steps", type=positive_int, help="DDIM steps (default 50)")
    parser.add_argument("--guidance", dest="guidance_scale", type=float, help="default 7.5")
    parser.add_argument("--width", type=positive_int, help="default: the model's native size")
    parser.add_argument("--height", type=positive_int, help="default: the model's native size")
    add_control_options(
        parser, start_step_help="first controlled step (default: model's; = steps: no control)"
    )
    _previews_option(parser)
    add_queue_options(parser)
    parser.add_argument("--idempotency-key", help="make retries of this submission safe")
    parser.add_argument(
        "--wait", action="store_true", help="follow the job to its end (implied by --out)"
    )


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    """``client`` with its actions: edit, synthesize, sequence, get, cancel, retry, wait,
    models."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    helps = {
        "edit": "submit a real-image edit",
        "synthesize": "submit a consistent synthesis",
        "sequence": "submit a sequence: consistent frames from one source and a series of layouts",
        "get": "print a job as JSON",
        "cancel": "cancel a queued or running job",
        "retry": "run a failed, canceled or expired job again (a new job, linked to it)",
        "wait": "follow a job with progress bars, then save its images",
        "models": "list the models and whether a worker serves them",
    }
    for action, help in helps.items():
        sub = actions.add_parser(action, help=help, description=help)
        if action in ("edit", "synthesize"):
            _job_options(sub, action)
            _follow_options(sub)
        elif action == "sequence":
            _sequence_options(sub)
            _follow_options(sub)
        elif action in ("get", "cancel", "wait", "retry"):
            sub.add_argument("job_id", metavar="JOB_ID")
            if action == "retry":
                add_queue_options(sub)
                sub.add_argument("--idempotency-key", help="make retries of this request safe")
            if action == "wait":
                _follow_options(sub)
            if action == "get":
                sub.add_argument(
                    "--wait-seconds",
                    type=non_negative_int,
                    help="hold the answer up to N seconds (≤ 60) for the job to end",
                )
        _connection_options(sub)


# --- building requests --------------------------------------------------------------------------


def _data_url(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def _control_starts(args: argparse.Namespace) -> dict[str, Any]:
    """The request's control start values; ``--no-control`` is an empty list of steps."""
    control: dict[str, Any] = {"steps": []} if args.no_control else {}
    for key in ("start_step", "start_layer"):
        if getattr(args, key) is not None:
            control[key] = getattr(args, key)
    return control


def _control(args: argparse.Namespace) -> dict[str, Any] | None:
    control = _control_starts(args)
    masks = mask_options(args)
    if masks is not None and masks.regions:
        control["mask"] = {
            "mode": "manual",
            "regions": [
                {
                    "source": _data_url(source, f"source mask {k}"),
                    "target": _data_url(target, f"target mask {k}"),
                }
                for k, (source, target) in enumerate(masks.regions)
            ],
        }
    elif masks is not None and masks.words is not None:
        source_word, target_word = masks.words
        control["mask"] = {"mode": "auto", "source_word": source_word, "target_word": target_word}
        if masks.threshold is not None:
            control["mask"]["threshold"] = masks.threshold
    return control or None


def _condition(args: argparse.Namespace) -> dict[str, Any] | None:
    options = condition_options(
        args, targets=len(args.target_prompts), editing=args.action == "edit"
    )
    if options is None:
        return None
    condition: dict[str, Any] = {
        "model": options.model,
        "images": [
            _data_url(path, f"condition image {k}") for k, path in enumerate(options.images)
        ],
        "scale": options.scale,
        "start": options.start,
        "end": options.end,
        "preprocess": options.preprocess,
    }
    if options.source_image is not None:
        condition["source_image"] = _data_url(options.source_image, "source condition image")
    return condition


def _loras(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The request's ``loras`` from ``--lora NAME[:WEIGHT]`` (the weight omitted: the catalog's)."""
    loras = [
        {"name": lora.name, **({} if lora.weight is None else {"weight": lora.weight})}
        for lora in args.loras
    ]
    return loras or None


def _job_params(args: argparse.Namespace) -> dict[str, Any]:
    webhook = None
    if args.webhook:
        webhook = {"url": args.webhook}
        if args.webhook_events:
            webhook["events"] = list(dict.fromkeys(args.webhook_events))
    elif args.webhook_events:
        raise UsageError("--webhook-event needs --webhook URL")
    return {
        "target_prompts": args.target_prompts,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "width": args.width,
        "height": args.height,
        "control": _control(args),
        "loras": _loras(args),
        "condition": _condition(args),
        **({"anchor_source": True} if getattr(args, "anchor_source", False) else {}),
        "webhook": webhook,
        "previews": True if args.previews else None,
        **queue_options(args),
        "idempotency_key": args.idempotency_key,
    }


def _sequence_params(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``MasaCtrlClient.sequence`` from ``args``; files are checked."""
    from masactrl_jobs.media import FRAME_SUFFIXES

    if (args.fps is not None or args.max_frames is not None) and args.video is None:
        raise UsageError("--fps and --max-frames sample a video: give --video")
    if args.anchor_source and args.image is None:
        raise UsageError("--anchor-source needs --image")
    if args.image is None and not (args.source_prompt or "").strip():
        raise UsageError("give --source-prompt (or --image as the source)")
    frames: list[Path | str] = []
    if args.frames is not None:
        if not args.frames.is_dir():
            raise UsageError(f"--frames {args.frames} is not a folder")
        frames = sorted(
            path for path in args.frames.iterdir() if path.suffix.lower() in FRAME_SUFFIXES
        )
        if not frames:
            raise UsageError(f"--frames {args.frames} holds no frame images")
    elif args.frame_files:
        frames = [_image_argument(value) for value in args.frame_files]
    condition = {
        key: value
        for key, value in {
            "model": args.condition_model,
            "fps": args.fps,
            "max_frames": args.max_frames,
            "preprocess": args.condition_preprocess,
            "scale": args.condition_scale,
            "start": args.condition_start,
            "end": args.condition_end,
        }.items()
        if value is not None
    }
    control = _control_starts(args)
    return {
        "target_prompts": args.target_prompts,
        "condition": condition,
        "frames": frames,
        "video": _image_argument(args.video, "video") if args.video is not None else None,
        "image": _image_argument(args.image) if args.image is not None else None,
        "source_prompt": args.source_prompt,
        "anchor_source": True if args.anchor_source else None,
        "fps": args.animation_fps,
        "negative_prompt": args.negative_prompt,
        "model": args.model,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "width": args.width,
        "height": args.height,
        "control": control or None,
        "loras": _loras(args),
        "previews": True if args.previews else None,
        **queue_options(args),
        "idempotency_key": args.idempotency_key,
    }


def _image_argument(value: str, what: str = "image") -> Path | str:
    if value.startswith(("data:", "https://", "http://", "s3://")):
        return value
    path = Path(value)
    if not path.is_file():
        raise UsageError(
            f"{what} file {path} does not exist" if not path.exists() else f"{path} is not a file"
        )
    return path


# --- following a job ----------------------------------------------------------------------------


class EventProgress:
    """Draws a job's SSE events: a status line per change, a tqdm bar per phase.

    ``on_preview`` gets the data of each ``preview`` event (jobs submitted with previews).
    """

    def __init__(
        self,
        label: str = "job",
        *,
        enabled: bool = True,
        on_preview: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        from masactrl_cli.generate import ProgressBars

        self.label = label
        self.enabled = enabled
        self.on_preview = on_preview
        self._bars = ProgressBars(enabled=enabled)
        self._status: str | None = None

    def __call__(self, event: Event) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        if event.event == "preview" and self.on_preview is not None:
            self.on_preview(data)
        elif event.event == "progress" and {"phase", "step", "total"} <= data.keys():
            self._bars(str(data["phase"]), int(data["step"]), int(data["total"]))
        elif event.event == "status" and self.enabled:
            status = data.get("status")
            if status and status != self._status and status != "running":
                # "running" is visible as the bars; a retry after a worker crash is worth a line.
                print(f"{self.label}: {status}", file=sys.stderr)
            elif status == "running" and int(data.get("attempt") or 1) > 1:
                self._bars.close()
                print(f"{self.label}: running again (attempt {data['attempt']})", file=sys.stderr)
            self._status = status or self._status

    def close(self) -> None:
        self._bars.close()


def follow(
    client: MasaCtrlClient,
    job_id: str,
    *,
    label: str = "job",
    quiet: bool = False,
    preview_dir: Path | None = None,
) -> dict[str, Any]:
    """Wait for the job through its event stream, drawing progress; returns the final job.

    With ``preview_dir``, each live preview's images are saved there as they come.
    """
    on_preview = None
    if preview_dir is not None:
        on_preview = functools.partial(client.download_preview, out_dir=preview_dir)
    progress = EventProgress(label, enabled=not quiet, on_preview=on_preview)
    try:
        return client.wait(job_id, on_event=progress)
    finally:
        progress.close()


def finish(
    client: MasaCtrlClient,
    job: dict[str, Any],
    out: Path | None,
    *,
    as_json: bool = False,
    show: bool = True,
) -> tuple[int, list[Path]]:
    """Save a finished job's images, print their paths (or the JSON) and its warnings (on
    stderr); 1 unless it succeeded."""
    saved: list[Path] = []
    if job.get("status") == "succeeded" and out is not None:
        saved = client.download(job, out)
    if as_json:
        print(json.dumps(job, indent=2))
    elif show and job.get("status") == "succeeded":
        for line in saved or [image["url"] for image in job["output"]["images"]]:
            print(line)
    # Whatever the job's end: a warning may be why its pictures are not what was asked.
    for warning in job.get("warnings") or []:
        print(f"masactrl client: warning: {warning}", file=sys.stderr)
    status = job.get("status")
    if status == "failed":
        error = job.get("error") or {}
        code, message = error.get("code", "error"), error.get("message", "no reason given")
        print(f"masactrl client: job {job['id']} failed: {code}: {message}", file=sys.stderr)
    elif status == "canceled":
        print(f"masactrl client: job {job['id']} was canceled", file=sys.stderr)
    return (0 if status == "succeeded" else EXIT_FAILED), saved


# --- running ------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> MasaCtrlClient:
    from masactrl_cli.http_client import MasaCtrlClient, resolve_api_key

    key = resolve_api_key(args.api_key)
    if key is None:
        raise UsageError(
            "no API key: pass --api-key, set MASACTRL_API_KEY, or run `make up` "
            "(it writes ./var/dev-api-key)"
        )
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    return MasaCtrlClient(args.api_url, key, timeout=args.timeout)


def _run(args: argparse.Namespace, client: MasaCtrlClient, params: dict[str, Any]) -> int:
    action = args.action
    if action == "models":
        print(json.dumps(client.models(), indent=2))
        return 0
    if action == "get":
        print(json.dumps(client.get(args.job_id, wait=args.wait_seconds), indent=2))
        return 0
    if action == "cancel":
        job = client.cancel(args.job_id)
        note = "" if job["status"] == "canceled" else " (it stops at its next step)"
        print(f"job {job['id']}: {job['status']}{note}")
        return 0
    if action == "retry":
        job = client.retry(args.job_id, **queue_options(args), idempotency_key=args.idempotency_key)
        print(job["id"])
        return 0
    if action == "wait":
        job = follow(client, args.job_id, quiet=args.quiet)
        return finish(client, job, args.out, as_json=args.json)[0]

    if action == "sequence":
        job = client.sequence(**params)
    elif action == "edit":
        job = client.edit(_image_argument(args.image), source_prompt=args.source_prompt, **params)
    else:
        job = client.synthesize(args.source_prompt, **params)
    if not (args.wait or args.out):
        print(json.dumps(job, indent=2) if args.json else job["id"])
        return 0
    if not args.quiet:
        print(f"{action}: job {job['id']} submitted", file=sys.stderr)
    preview_dir = args.out / "preview" if args.previews and args.out is not None else None
    job = follow(client, job["id"], label=action, quiet=args.quiet, preview_dir=preview_dir)
    return finish(client, job, args.out, as_json=args.json)[0]


def run(args: argparse.Namespace) -> int:
    """Run one client action; gateway errors become one line (exit 2 for 4xx, 1 otherwise)."""
    from masactrl_cli.http_client import ApiError, ClientError

    # Bad flags and unreadable files fail before any request.
    params: dict[str, Any] = {}
    if args.action in ("edit", "synthesize"):
        params = _job_params(args)
    elif args.action == "sequence":
        params = _sequence_params(args)
    try:
        with _client(args) as client:
            return _run(args, client, params)
    except ApiError as exc:
        message = f"{exc} (HTTP {exc.status} {exc.code})"
        if exc.status < 500:
            raise UsageError(message) from None
        print(f"masactrl client: error: {message}", file=sys.stderr)
        return EXIT_FAILED
    except ClientError as exc:
        print(f"masactrl client: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        # Reading the image or writing results: still one line, never a traceback.
        raise UsageError(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None
