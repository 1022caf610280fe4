"""``masactrl demo``: the whole service once, end to end, on this machine.

Brings the local stack up (or reuses the one ``masactrl up`` runs), submits jobs through the HTTP
API with the dev key, follows them over Server-Sent Events with progress bars, saves the results
under ./out/ and stops whatever it started, also on Ctrl-C or an error.

On the toy-world model (the stack's default): a real-image edit of a committed render and a
consistent synthesis, each also with MasaCtrl off, and a side-by-side sheet (source | without
MasaCtrl | with MasaCtrl) at ``out/comparison.png``. On the random tiny checkpoint
(``MASACTRL_MODEL=tiny``): an edit of the bundled sample and a synthesis. On whichever model offers
the ``canny`` condition model (the tiny one, which the default stack serves beside the toy one):
a layout-guided edit (``out/layout``: the sample's canny edge map through the ``canny``
ControlNet, the source anchored to its inversion) and a sequence (``out/sequence``: four frames of
``examples/dance.mp4`` as canny layouts) — plumbing only, their pictures are noise.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import sys
import time
from pathlib import Path, PurePosixPath
from types import FrameType
from typing import TYPE_CHECKING, Any

from masactrl_cli.errors import StackError, UsageError

if TYPE_CHECKING:
    from masactrl_cli.http_client import MasaCtrlClient
    from masactrl_cli.stack import LocalStack

SAMPLE_IMAGE = Path("examples/house-and-cat.png")
# The layouts of the demo's sequence: toy-world renders of a creature dancing (examples/dance.py).
DANCE_VIDEO = Path("examples/dance.mp4")
# A render of the toy world to edit: masactrl_toy.world.scene_pair(1)[0] (= random_scene(1)) at
# 32 px. The edit changes the arms in place: of the four one-attribute edits of a render (arms,
# stance, facing, position), `bench/ablation.py --edits` found arms the one the model follows and
# where MasaCtrl keeps the most of the source; a move across the picture ("on the right") follows
# neither way. It still keeps little more than the inversion alone does, and the caption says so.
TOY_SCENE = Path("examples/toy-scene.png")
TOY_EDIT: dict[str, Any] = {
    "source_prompt": "a creature with arms up sitting facing left on snow on the left",
    "target_prompts": ["a creature with arms down sitting facing left on snow on the left"],
}
# The sheet's caption per row: what bench/ablation.py measured for that task (docs/toy-world.md).
TOY_EDIT_MEASURED = (
    "arms edit, 8 fresh renders: on/off source->target colour distance 0.94x; inversion keeps most"
)
# docs/ablation.json: the default control on / off over 8 unselected scene pairs x 3 seeds.
TOY_SYNTHESIS_MEASURED = (
    "synthesis, 8 unselected pairs x 3 seeds: on/off source->target colour distance 0.84x"
)
TOY_SYNTHESIS_SEED = 0
# Any: spread into the client's keyword arguments, each of its own type.
EDIT: dict[str, Any] = {
    "source_prompt": "a house and a cat",
    "target_prompts": ["a red house and a cat jumping"],
}
LAYOUT_EDIT: dict[str, Any] = {
    "source_prompt": "a house and a cat",
    "target_prompts": ["a snowy house and a cat"],
    "anchor_source": True,
}
SYNTHESIS: dict[str, Any] = {
    "source_prompt": "a cat sitting",
    "target_prompts": ["a cat running", "a cat jumping"],
    "seed": 42,
}


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of ``demo``."""
    from masactrl_cli.stack import default_help

    parser.add_argument(
        "--image", type=Path, help=f"image to edit (default: the bundled {SAMPLE_IMAGE})"
    )
    parser.add_argument(
        "--steps", type=int, default=50, help="denoising steps per job (default %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out"), help="results folder (default %(default)s)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--port", type=int, help=f"gateway port of the stack to use or start {default_help('port')}"
    )


def _sample_image(explicit: Path | None, default: Path) -> Path:
    from masactrl_cli.devenv import bundled

    if explicit is not None:
        if not explicit.is_file():
            raise UsageError(f"image file {explicit} does not exist")
        return explicit
    found = bundled(default)
    if found is None:
        raise UsageError(f"the sample image {default} is missing; pass --image FILE")
    return found


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (a CI timeout, `kill`) and SIGHUP (a closed terminal) take the same way out as
    # Ctrl-C: through the cleanup in run().
    raise KeyboardInterrupt


def _toy_examples() -> list[dict[str, str]] | None:
    """The toy checkpoint's example prompt pairs, if this checkout has it."""
    from masactrl_cli.devenv import TOY_MODEL, bundled

    found = bundled(TOY_MODEL / "examples.json")
    return json.loads(found.read_text(encoding="utf-8")) if found is not None else None


def _run_jobs(stack: LocalStack, args: argparse.Namespace, submitted: list[str]) -> int:
    from masactrl_cli.client import finish, follow
    from masactrl_cli.devenv import TOY_MODEL
    from masactrl_cli.http_client import MasaCtrlClient

    with MasaCtrlClient(stack.api_url, stack.api_key, timeout=60) as client:
        models = client.models()
        served = next(m for m in models["data"] if m["name"] == models["default"])
        examples = _toy_examples() if served["name"] == TOY_MODEL.name else None
        edit_request: dict[str, Any]
        synthesis_request: dict[str, Any]
        if examples:
            image = _sample_image(args.image, TOY_SCENE)
            edit_request, synthesis_request = (
                TOY_EDIT,
                {
                    "source_prompt": examples[0]["source_prompt"],
                    "target_prompts": [examples[0]["target_prompt"]],
                    "seed": TOY_SYNTHESIS_SEED,
                },
            )
        else:
            image = _sample_image(args.image, SAMPLE_IMAGE)
            edit_request, synthesis_request = EDIT, SYNTHESIS
        # All are queued at once; the worker takes them one after the other.
        edit = client.edit(image, steps=args.steps, seed=0, **edit_request)
        submitted.append(edit["id"])
        synthesis = client.synthesize(steps=args.steps, **synthesis_request)
        submitted.append(synthesis["id"])
        print(f"submitted edit {edit['id']} and synthesis {synthesis['id']} to {stack.api_url}")
        jobs = [("edit", edit), ("synthesis", synthesis)]
        if examples:
            # The same jobs with MasaCtrl off (mutual self-attention at no step), for the sheet.
            off: dict[str, Any] = {"steps": []}
            for label, job in (
                (
                    "edit-off",
                    client.edit(image, steps=args.steps, seed=0, control=off, **edit_request),
                ),
                (
                    "synthesis-off",
                    client.synthesize(steps=args.steps, control=off, **synthesis_request),
                ),
            ):
                submitted.append(job["id"])
                jobs.append((label, job))
            print("submitted both again with MasaCtrl off, for the comparison sheet")
        jobs += _condition_jobs(client, models, args, submitted)
        status = 0
        results: dict[str, dict[str, Path]] = {}
        for label, job in jobs:
            final = follow(client, job["id"], label=label, quiet=args.quiet)
            code, saved = finish(client, final, args.out / label, show=False)
            if code == 0:
                seconds = (final.get("metrics") or {}).get("total_seconds")
                took = f" in {seconds:.1f} s" if seconds is not None else ""
                print(f"{label} done{took}: {', '.join(str(p) for p in saved[:-1])}")
                results[label] = _by_role(final, args.out / label)
            status = status or code
        if examples and status == 0:
            sheet = write_sheet(
                [
                    (
                        "real-image edit",
                        image,
                        results["edit-off"]["target"],
                        results["edit"]["target"],
                    ),
                    (
                        "synthesis",
                        results["synthesis"]["source"],
                        results["synthesis-off"]["target"],
                        results["synthesis"]["target"],
                    ),
                ],
                args.out / "comparison.png",
                captions=[TOY_EDIT_MEASURED, TOY_SYNTHESIS_MEASURED],
            )
            print(f"comparison sheet (source | without MasaCtrl | with MasaCtrl): {sheet}")
    return status


def _condition_jobs(
    client: MasaCtrlClient,
    models: dict[str, Any],
    args: argparse.Namespace,
    submitted: list[str],
) -> list[tuple[str, dict[str, Any]]]:
    """A layout-guided edit and a sequence on the model that offers the ``canny`` condition model
    (the tiny one, served beside the toy model), if the stack serves one; plumbing only: its
    weights are random."""
    from masactrl_cli.devenv import TINY_CONDITION, bundled
    from masactrl_cli.http_client import image_url

    entry = next(
        (
            m
            for m in sorted(models["data"], key=lambda m: m["name"] != models["default"])
            if any(c["name"] == TINY_CONDITION for c in m.get("conditions", []))
        ),
        None,
    )
    if entry is None:
        print(f"no model offers the {TINY_CONDITION!r} condition model: no layout, no sequence")
        return []
    model = entry["name"]
    image = _sample_image(args.image, SAMPLE_IMAGE)
    edges = {"model": TINY_CONDITION, "images": [image_url(image)], "preprocess": "canny"}
    layout = client.edit(
        image, steps=args.steps, seed=0, condition=edges, model=model, **LAYOUT_EDIT
    )
    submitted.append(layout["id"])
    print(f"submitted layout-guided edit {layout['id']} on {model} (canny map of {image})")
    jobs = [("layout", layout)]
    video = bundled(DANCE_VIDEO)
    if video is None:
        print(f"{DANCE_VIDEO} is missing: no sequence")
        return jobs
    # A few frames of the clip keep it to seconds on a CPU.
    frames = {"model": TINY_CONDITION, "preprocess": "canny", "fps": 4, "max_frames": 4}
    sequence = client.sequence(
        ["a creature dancing"],
        frames,
        video=video,
        source_prompt="a creature",
        model=model,
        steps=args.steps,
        seed=0,
        fps=4,
    )
    submitted.append(sequence["id"])
    print(f"submitted sequence {sequence['id']} on {model} (canny maps of {video})")
    jobs.append(("sequence", sequence))
    return jobs


def _by_role(job: dict[str, Any], folder: Path) -> dict[str, Path]:
    """The saved file of the first image of each role ("source", "target") of a finished job."""
    found: dict[str, Path] = {}
    for image in (job.get("output") or {}).get("images", []):
        found.setdefault(image["role"], folder / PurePosixPath(image["key"]).name)
    return found


def write_sheet(
    rows: list[tuple[str, Path, Path, Path]],
    path: Path,
    scale: int = 6,
    captions: list[str] | None = None,
) -> Path:
    """A grid, one row per task: source | without MasaCtrl | with MasaCtrl, enlarged ``scale``×
    with square pixels (the toy model draws at 32 px), each row with its caption line below it
    (what the method measurably does on that task, so a row that shows little says so)."""
    from PIL import Image, ImageDraw

    headers = ("source", "without MasaCtrl", "with MasaCtrl")
    from masactrl_jobs.media import open_image

    images = [[open_image(p, what="result", mode="RGB") for p in row[1:]] for row in rows]
    side = max(im.width for row in images for im in row) * scale
    label_w, header_h, gap = 120, 24, 6
    caption_h = 18 if captions else 0
    row_h = side + caption_h + gap
    sheet = Image.new("RGB", (label_w + 3 * (side + gap), header_h + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    for c, header in enumerate(headers):
        draw.text((label_w + c * (side + gap) + 4, 6), header, fill="black")
    for r, ((label, *_), row) in enumerate(zip(rows, images, strict=True)):
        y = header_h + r * row_h
        draw.text((6, y + side // 2 - 6), label, fill="black")
        for c, image in enumerate(row):
            enlarged = image.resize((side, side), Image.Resampling.NEAREST)
            sheet.paste(enlarged, (label_w + c * (side + gap), y))
        if captions:
            draw.text((6, y + side + 3), captions[r], fill=(60, 60, 60))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _cancel(stack: LocalStack, job_ids: list[str]) -> None:
    """Best effort: an interrupted demo's jobs must not run first on the next start (AOF)."""
    from masactrl_cli.http_client import ClientError, MasaCtrlClient

    with MasaCtrlClient(stack.api_url, stack.api_key, timeout=5, retries=0) as client:
        for job_id in job_ids:
            # A job that already ended answers 409; a gateway that is gone, nothing.
            with contextlib.suppress(ClientError):
                client.cancel(job_id)


def run(args: argparse.Namespace) -> int:
    """Up (or reuse), two jobs, results under --out, then stop what this run started."""
    from masactrl_cli.http_client import ClientError
    from masactrl_cli.stack import LocalStack, load_stack_settings

    # Line by line, so that status lines and the progress bars on stderr interleave in a log.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if args.image is not None and not args.image.is_file():
        raise UsageError(f"image file {args.image} does not exist")
    stack = LocalStack(load_stack_settings(port=args.port))
    started: list[str] = []
    already: dict[str, int] = {}
    submitted: list[str] = []
    completed = False
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    begin = time.monotonic()
    try:
        already = stack.running()
        started = stack.up()
        if not started:
            print(f"using the running stack ({', '.join(already)})")
        status = _run_jobs(stack, args, submitted)
        completed = True
        took = f"demo took {time.monotonic() - begin:.0f} s"
        # A gateway this demo started stops below: its docs URL would lead nowhere.
        print(took if started else f"API docs: {stack.api_url}/docs   ({took})")
        return status
    except (StackError, ClientError) as exc:
        print(f"masactrl demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave processes behind.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if submitted and not completed:
                _cancel(stack, submitted)
            if started:
                print(f"stopping the stack this demo started ({', '.join(started)})")
                stack.down(started)
            elif already or stack.running():
                print("the stack keeps running (`make down` stops it)")
        finally:
            signal.signal(signal.SIGINT, interrupt)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
