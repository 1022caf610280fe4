"""Screenshots of the playground at work, for the README: ``docs/playground-previews.png`` (live
previews of a synthesis while it runs), ``docs/playground-synthesis.png`` and
``docs/playground-edit.png``.

Drives Debian's chromium (Playwright) through a synthesis and an edit with a drawn mask on a
running stack, so re-taking them on another model is one command::

    make up                                               # or: MASACTRL_MODEL=<folder> make up
    .venv/bin/python docs/screenshots.py                  # the stack's default model
    .venv/bin/python docs/screenshots.py --model tiny --source-prompt "..." --target-prompt "..."

The API key is read from ``var/dev-api-key`` (``make up`` writes it) unless ``--api-key`` is
given; ``--url`` points at another gateway.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Long enough for a real model's 30 steps on a GPU, or the tiny one's on a busy CPU.
JOB_TIMEOUT_MS = 600_000
CREATURE = "a creature with"
SCENE = "facing left on snow on the left"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway")
    parser.add_argument("--api-key", help="default: the contents of var/dev-api-key")
    parser.add_argument("--model", help="a catalog model name (default: the catalog's default)")
    # The defaults are the toy world's (models/toy-shapes), which `make up` serves by default: the
    # demo's in-place edit, and a synthesis of the same creature in two other poses.
    parser.add_argument("--image", type=Path, default=REPO / "examples/toy-scene.png")
    parser.add_argument("--edit-source-prompt", default=f"{CREATURE} arms up sitting {SCENE}")
    parser.add_argument("--edit-target-prompt", default=f"{CREATURE} arms down sitting {SCENE}")
    parser.add_argument(
        "--mask-columns",
        type=float,
        nargs=2,
        default=(0.15, 0.15),
        metavar=("SOURCE", "TARGET"),
        help="left edge of the drawn region in the photo and in the targets, as a width fraction",
    )
    parser.add_argument("--source-prompt", default=f"{CREATURE} arms up sitting {SCENE}")
    parser.add_argument("--target-prompt", action="append", help="repeat for several targets")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-previews", action="store_true", help="for a gateway without them")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    return parser.parse_args(argv)


def open_page(page: Page, args: argparse.Namespace, key: str) -> None:
    page.goto(f"{args.url}/playground")
    page.get_by_test_id("api-key").fill(key)
    page.get_by_test_id("api-key").press("Tab")
    expect(page.locator("#model option").first).to_be_attached()
    if args.model:
        page.get_by_test_id("model").select_option(args.model)
    page.get_by_test_id("seed").fill(str(args.seed))
    page.get_by_test_id("steps").fill(str(args.steps))
    page.get_by_test_id("previews").set_checked(not args.no_previews)


def run_and_wait(page: Page, previews_shot: Path | None = None) -> None:
    page.get_by_test_id("submit").click()
    if previews_shot is not None:
        # The first live previews, while the job runs (the results replace them at the end).
        try:
            page.wait_for_function(
                """() => [...document.querySelectorAll('[data-testid=preview-image]')]
                           .some(img => img.complete && img.naturalWidth > 0)""",
                timeout=JOB_TIMEOUT_MS,
            )
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(previews_shot))
            print(previews_shot)
        except PlaywrightError:
            print("no preview arrived before the job ended: more --steps?", file=sys.stderr)
    expect(page.locator("#status")).to_have_text("Succeeded.", timeout=JOB_TIMEOUT_MS)
    page.wait_for_function(
        """() => [...document.querySelectorAll('img[data-testid]')]
                   .every(img => img.complete && img.naturalWidth > 0)"""
    )


def synthesis(page: Page, args: argparse.Namespace, key: str) -> Path:
    open_page(page, args, key)
    page.get_by_test_id("mode").select_option("synthesis")
    page.get_by_test_id("source-prompt").fill(args.source_prompt)
    targets = args.target_prompt or [
        f"{CREATURE} arms down sitting {SCENE}",
        f"{CREATURE} arms up standing {SCENE}",
    ]
    for index, target in enumerate(targets):
        if index:
            page.get_by_role("button", name="Add a target").click()
        page.get_by_test_id("target-prompt").nth(index).fill(target)
    previews = None if args.no_previews else args.out / "playground-previews.png"
    run_and_wait(page, previews)
    page.evaluate("window.scrollTo(0, 0)")
    path = args.out / "playground-synthesis.png"
    page.screenshot(path=str(path))
    return path


def edit(page: Page, args: argparse.Namespace, key: str) -> Path:
    open_page(page, args, key)
    page.get_by_test_id("mode").select_option("edit")
    page.get_by_test_id("image-input").set_input_files(str(args.image))
    page.get_by_test_id("source-prompt").fill(args.edit_source_prompt)
    page.get_by_test_id("target-prompt").first.fill(args.edit_target_prompt)
    page.get_by_test_id("mask-mode").select_option("manual")
    canvas = page.get_by_test_id("mask-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box is not None
    # One region over the subject: where it is in the photo, where it should be in the targets.
    for side, left in zip(("source", "target"), args.mask_columns, strict=True):
        page.get_by_test_id("mask-side").select_option(side)
        for row in range(6):
            y = box["y"] + (0.45 + 0.07 * row) * box["height"]
            page.mouse.move(box["x"] + left * box["width"], y)
            page.mouse.down()
            page.mouse.move(box["x"] + (left + 0.35) * box["width"], y, steps=6)
            page.mouse.up()
    run_and_wait(page)
    path = args.out / "playground-edit.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    key_file = REPO / "var/dev-api-key"
    key = args.api_key or (key_file.read_text().strip() if key_file.exists() else "")
    if not key:
        print("screenshots: no API key: pass --api-key or run `make up` first", file=sys.stderr)
        return 2
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        for take in (synthesis, edit):
            print(take(context.new_page(), args, key))
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
