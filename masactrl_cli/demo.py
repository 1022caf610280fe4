"""``masactrl demo``: the whole service once, end to end, on this machine.

Brings the local stack up (or reuses the one ``masactrl up`` runs), submits a real-image edit of
the bundled sample, a consistent synthesis and a layout-guided edit (the sample's canny edge map
through the catalog's ``canny`` ControlNet, the source anchored to its inversion) through the HTTP
API with the dev key, follows them over Server-Sent Events with progress bars, saves the results
under ./out/ and stops whatever it started, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from masactrl_cli.errors import StackError, UsageError

if TYPE_CHECKING:
    from masactrl_cli.stack import LocalStack

SAMPLE_IMAGE = Path("examples/house-and-cat.png")
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
        "--steps", type=int, default=20, help="denoising steps per job (default %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("out"), help="results folder (default %(default)s)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--port", type=int, help=f"gateway port of the stack to use or start {default_help('port')}"
    )


def _sample_image(explicit: Path | None) -> Path:
    if explicit is not None:
        if not explicit.is_file():
            raise UsageError(f"image file {explicit} does not exist")
        return explicit
    # From the repository root (make demo) or, for an installed package, next to its sources.
    for candidate in (SAMPLE_IMAGE, Path(__file__).resolve().parents[1] / SAMPLE_IMAGE):
        if candidate.is_file():
            return candidate
    raise UsageError(f"the sample image {SAMPLE_IMAGE} is missing; pass --image FILE")


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (a CI timeout, `kill`) and SIGHUP (a closed terminal) take the same way out as
    # Ctrl-C: through the cleanup in run().
    raise KeyboardInterrupt


def _run_jobs(
    stack: LocalStack, image: Path, args: argparse.Namespace, submitted: list[str]
) -> int:
    from masactrl_cli.client import finish, follow
    from masactrl_cli.devenv import TINY_CONDITION
    from masactrl_cli.http_client import MasaCtrlClient, image_url

    with MasaCtrlClient(stack.api_url, stack.api_key, timeout=60) as client:
        # All are queued at once; the worker takes them one after the other.
        edit = client.edit(image, steps=args.steps, seed=0, **EDIT)
        submitted.append(edit["id"])
        synthesis = client.synthesize(steps=args.steps, **SYNTHESIS)
        submitted.append(synthesis["id"])
        print(f"submitted edit {edit['id']} and synthesis {synthesis['id']} to {stack.api_url}")
        jobs = [("edit", edit), ("synthesis", synthesis)]
        models = client.models()
        served = next(m for m in models["data"] if m["name"] == models["default"])
        if any(c["name"] == TINY_CONDITION for c in served.get("conditions", [])):
            edges = {"model": TINY_CONDITION, "images": [image_url(image)], "preprocess": "canny"}
            layout = client.edit(image, steps=args.steps, seed=0, condition=edges, **LAYOUT_EDIT)
            submitted.append(layout["id"])
            print(f"submitted layout-guided edit {layout['id']} (canny map of {image})")
            jobs.append(("layout", layout))
        else:
            print(f"{served['name']} offers no {TINY_CONDITION!r} condition model: no layout edit")
        status = 0
        for label, job in jobs:
            final = follow(client, job["id"], label=label, quiet=args.quiet)
            code, saved = finish(client, final, args.out / label, show=False)
            if code == 0:
                seconds = (final.get("metrics") or {}).get("total_seconds")
                took = f" in {seconds:.1f} s" if seconds is not None else ""
                print(f"{label} done{took}: {', '.join(str(p) for p in saved[:-1])}")
            status = status or code
    return status


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
    image = _sample_image(args.image)
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
        status = _run_jobs(stack, image, args, submitted)
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
