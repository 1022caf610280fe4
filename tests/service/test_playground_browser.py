"""The playground in a real browser (Debian's chromium, driven by Playwright) against a real
local stack: ``masactrl up`` with its gateway, Redis, GPU worker on the tiny checkpoint and
webhook worker, started once for this module and always torn down.

Every test fails on a console error or an uncaught exception in the page, except the 4xx
answers a test provokes on purpose (chromium logs each failed request as a console error).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.images import data_url, png_bytes
from tests.masactrl_cli.conftest import StackRun, _logs, kill_groups, masactrl, stack_environment

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples/house-and-cat.png"
# A job on the tiny checkpoint takes a second or two; the margin is for a busy 2-core machine.
JOB_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackRun]:
    root = tmp_path_factory.mktemp("playground-stack")
    # A preview every step, at most every 0.2 s: several previews within a short tiny job.
    env = stack_environment(
        root, MASACTRL_PREVIEW_EVERY_STEPS="1", MASACTRL_PREVIEW_MIN_INTERVAL_SECONDS="0.2"
    )
    run = StackRun(root, env)
    try:
        result = run.run("up")
        assert result.returncode == 0, result.stdout + result.stderr + _logs(root)
        yield run
    finally:
        masactrl(root, run.env, "down", timeout=60)
        kill_groups(run.seen | set(run.pids().values()))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (bash .ci/install-chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


class Console:
    """What the page said on its console, and the requests the test expects to fail."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.expected_failures = 0

    def unexpected(self) -> list[str]:
        failed = [e for e in self.errors if e.startswith("Failed to load resource")]
        others = [e for e in self.errors if not e.startswith("Failed to load resource")]
        return others + failed[self.expected_failures :]


@pytest.fixture()
def console() -> Console:
    return Console()


@pytest.fixture()
def page(browser: Browser, stack: StackRun, console: Console) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.on("console", lambda m: console.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: console.errors.append(f"uncaught: {error}"))
    page.goto(f"{stack.api_url}/playground")
    page.get_by_test_id("api-key").fill(stack.api_key)
    page.get_by_test_id("api-key").press("Tab")
    expect(page.locator("#model option[value=tiny]")).to_have_count(1)
    yield page
    context.close()
    assert console.unexpected() == []


def api(stack: StackRun) -> httpx.Client:
    return httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30
    )


def job_id_of(page: Page) -> str:
    """The id of the job the page follows, from its parameters panel."""
    text = page.locator("#job-json").text_content() or ""
    match = re.search(r'"id": "([0-9a-f-]{36})"', text)
    assert match, text
    return match.group(1)


def record_run(page: Page) -> None:
    """Keep every value the progress bar takes and every preview shown, to assert on the run as
    the user saw it (the results replace the previews at the end)."""
    page.evaluate(
        """() => {
          window.seenProgress = [];
          window.seenPreviews = [];
          const bar = document.querySelector('[data-testid=progress]');
          new MutationObserver(() => window.seenProgress.push(bar.getAttribute('aria-valuetext')))
            .observe(bar, {attributes: true, attributeFilter: ['aria-valuetext']});
          new MutationObserver((changes) => {
            for (const change of changes) {
              const img = change.target;
              if (img.dataset && img.dataset.testid === 'preview-image' && img.src) {
                window.seenPreviews.push({alt: img.alt, src: img.src, width: img.naturalWidth});
              }
            }
          }).observe(document.querySelector('#previews-box'),
                     {subtree: true, attributes: true, attributeFilter: ['src']});
        }"""
    )


def wait_until_done(page: Page) -> None:
    """Wait for the job to end (or for an error to show), then expect a success."""
    page.wait_for_function(
        """() => /^(Succeeded|Failed|Canceled)/.test(document.querySelector('#status').textContent)
                 || document.querySelector('[data-testid=error]') !== null""",
        timeout=JOB_TIMEOUT_MS,
    )
    expect(page.get_by_test_id("error")).to_have_count(0)
    expect(page.locator("#status")).to_have_text("Succeeded.")


def all_loaded(page: Page, testid: str) -> None:
    """Wait until every image with the test id has loaded (a broken one has no natural width)."""
    page.wait_for_function(
        f"""() => [...document.querySelectorAll('[data-testid={testid}]')]
                   .every(img => img.complete && img.naturalWidth > 0)""",
        timeout=10_000,
    )


def fill_prompts(page: Page, source: str, *targets: str) -> None:
    page.get_by_test_id("source-prompt").fill(source)
    for index, target in enumerate(targets):
        if index:
            page.get_by_role("button", name="Add a target").click()
        page.get_by_test_id("target-prompt").nth(index).fill(target)


def test_a_synthesis_shows_progress_previews_and_two_result_images(
    page: Page, stack: StackRun
) -> None:
    page.get_by_test_id("mode").select_option("synthesis")
    expect(page.get_by_test_id("previews")).to_be_checked()  # opted in by default
    fill_prompts(page, "a cat sitting", "a cat running")
    page.get_by_test_id("seed").fill("7")
    page.get_by_test_id("steps").fill("30")
    record_run(page)
    page.get_by_test_id("submit").click()

    wait_until_done(page)
    results = page.get_by_test_id("result-image")
    expect(results).to_have_count(2)
    expect(page.get_by_test_id("progress")).to_have_attribute("value", "1")
    seen = page.evaluate("window.seenProgress")
    assert "denoise step 30 of 30" in seen and len(seen) >= 2, seen
    # Both images were previewed while the job ran, from signed URLs that carry no API key.
    previews = page.evaluate("window.seenPreviews")
    assert {p["alt"] for p in previews} == {
        "Live preview of source 0",
        "Live preview of target 0",
    }, previews
    for preview in previews:
        assert "/v1/files/results/" in preview["src"] and "signature=" in preview["src"]
        assert stack.api_key not in preview["src"] and preview["width"] > 0
    expect(page.get_by_test_id("preview-image")).to_have_count(0)  # the results replaced them
    all_loaded(page, "result-image")
    job = api(stack).get(f"/v1/jobs/{job_id_of(page)}").json()
    assert job["input"]["seed"] == 7 and job["input"]["target_prompts"] == ["a cat running"]
    assert [image["role"] for image in job["output"]["images"]] == ["source", "target"]


def test_a_jobs_warnings_are_shown_in_the_job_panel(page: Page, stack: StackRun) -> None:
    # The stack's tiny model declares no vocabulary, so its jobs have no warnings: the page's
    # event stream is passed through with one added to the job that ends it, as a worker on a
    # model that declares a vocabulary writes it.
    warning = "target_prompts[0]: the model does not know the word 'house'"

    def with_a_warning(route: Any) -> None:
        response = route.fetch()
        body = response.text().replace('"warnings": []', f'"warnings": ["{warning}"]')
        route.fulfill(response=response, body=body)

    page.route("**/v1/jobs/*/events*", with_a_warning)
    page.get_by_test_id("mode").select_option("synthesis")
    page.get_by_test_id("previews").uncheck()
    fill_prompts(page, "a cat", "a house")
    page.get_by_test_id("steps").fill("2")
    page.get_by_test_id("submit").click()

    wait_until_done(page)
    expect(page.get_by_test_id("job-warnings")).to_be_visible()
    expect(page.get_by_test_id("job-warnings").locator("li")).to_have_text([warning])
    # A job without warnings hides the list again.
    first = job_id_of(page)
    page.unroute("**/v1/jobs/*/events*")
    page.get_by_test_id("submit").click()
    expect(page.locator("#job-json")).not_to_contain_text(first, timeout=JOB_TIMEOUT_MS)
    wait_until_done(page)
    expect(page.get_by_test_id("job-warnings")).to_be_hidden()


def test_an_edit_of_an_uploaded_photo_with_a_drawn_mask(page: Page, stack: StackRun) -> None:
    page.get_by_test_id("mode").select_option("edit")
    page.get_by_test_id("previews").uncheck()
    page.get_by_test_id("image-input").set_input_files(
        {"name": "photo.png", "mimeType": "image/png", "buffer": png_bytes(64, 64)}
    )
    expect(page.locator("#drop-zone img")).to_be_visible()
    fill_prompts(page, "a photo", "a photo, jumping")
    page.get_by_test_id("steps").fill("8")
    page.get_by_test_id("mask-mode").select_option("manual")
    canvas = page.get_by_test_id("mask-canvas")
    canvas.scroll_into_view_if_needed()  # the mouse draws only where the viewport shows
    box = canvas.bounding_box()
    assert box is not None

    def draw(x0: float, y0: float, x1: float, y1: float) -> None:
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=8)
        page.mouse.up()

    draw(0.2, 0.3, 0.5, 0.6)
    page.get_by_test_id("mask-side").select_option("target")
    draw(0.4, 0.3, 0.8, 0.6)
    page.get_by_test_id("submit").click()

    wait_until_done(page)
    expect(page.get_by_test_id("result-image")).to_have_count(2)
    # The masks it used, beside the results.
    expect(page.locator("#results img.mask")).to_have_count(2)
    job = api(stack).get(f"/v1/jobs/{job_id_of(page)}").json()
    assert job["kind"] == "edit" and job["input"]["image"].startswith("inputs/")
    mask = job["input"]["control"]["mask"]
    assert mask["mode"] == "manual" and len(mask["regions"]) == 1


def test_a_validation_error_is_the_apis_sentence_next_to_its_field(
    page: Page, console: Console
) -> None:
    page.get_by_test_id("mode").select_option("synthesis")
    fill_prompts(page, "a cat sitting", "a cat running")
    page.get_by_test_id("seed").fill(str(2**32))  # one past the largest seed
    console.expected_failures = 1  # the 422
    page.get_by_test_id("submit").click()

    error = page.get_by_test_id("error")
    expect(error).to_have_count(1)
    expect(error).to_contain_text("seed")
    expect(error).to_contain_text("4294967295")
    # Inside the seed's field, right under it, and that field is marked.
    expect(page.locator('[data-field="seed"] [data-testid="error"]')).to_be_visible()
    expect(page.locator('[data-field="seed"]')).to_have_class(re.compile(r"\binvalid\b"))
    expect(page.get_by_test_id("submit")).to_be_enabled()

    page.get_by_test_id("seed").fill("3")
    page.get_by_test_id("steps").fill("4")
    page.get_by_test_id("previews").uncheck()
    page.get_by_test_id("submit").click()
    wait_until_done(page)
    expect(page.get_by_test_id("result-image")).to_have_count(2)


def test_cancel_stops_a_long_job(page: Page, stack: StackRun) -> None:
    page.get_by_test_id("mode").select_option("synthesis")
    page.get_by_test_id("previews").uncheck()
    fill_prompts(page, "a cat sitting", "a cat running", "a cat sleeping")
    page.get_by_test_id("steps").fill("150")
    page.get_by_test_id("submit").click()
    cancel = page.get_by_test_id("cancel")
    expect(cancel).to_be_enabled()
    cancel.click()

    expect(page.locator("#status")).to_have_text("Canceled.", timeout=JOB_TIMEOUT_MS)
    expect(page.get_by_test_id("result-image")).to_have_count(0)
    expect(cancel).to_be_disabled()
    expect(page.get_by_test_id("submit")).to_be_enabled()
    assert api(stack).get(f"/v1/jobs/{job_id_of(page)}").json()["status"] == "canceled"


def test_priority_deadline_and_retry_of_a_canceled_job(
    page: Page, stack: StackRun, console: Console
) -> None:
    page.get_by_test_id("mode").select_option("synthesis")
    page.get_by_test_id("previews").uncheck()
    fill_prompts(page, "a cat sitting", "a cat running")
    page.get_by_test_id("steps").fill("150")
    page.get_by_test_id("priority-field").fill("2")
    # A deadline already past is the API's sentence next to the deadline's field.
    page.get_by_test_id("start-by-field").fill("2020-01-01T00:00:00")
    console.expected_failures = 1  # the 422
    page.get_by_test_id("submit").click()
    expect(page.locator('[data-field="start_by"] [data-testid="error"]')).to_contain_text(
        "already passed"
    )
    page.get_by_test_id("start-by-field").fill("")
    page.get_by_test_id("submit").click()
    retry = page.get_by_test_id("retry-button")
    expect(retry).to_be_hidden()
    page.get_by_test_id("cancel").click()
    expect(page.locator("#status")).to_have_text("Canceled.", timeout=JOB_TIMEOUT_MS)
    first = job_id_of(page)

    expect(retry).to_be_visible()
    retry.click()
    expect(retry).to_be_hidden()
    expect(page.locator("#status")).not_to_have_text("Canceled.")  # following the new job
    expect(page.get_by_test_id("cancel")).to_be_enabled()
    page.get_by_test_id("cancel").click()
    expect(page.locator("#status")).to_have_text("Canceled.", timeout=JOB_TIMEOUT_MS)
    assert job_id_of(page) != first
    with api(stack) as client:
        original = client.get(f"/v1/jobs/{first}").json()
        retried = client.get(f"/v1/jobs/{original['retried_by']}").json()
    assert retried["retry_of"] == first and retried["priority"] == 2 == original["priority"]
    assert retried["input"] == original["input"]


def _finished_synthesis(stack: StackRun, source: str, target: str) -> dict[str, Any]:
    with api(stack) as client:
        body = {"source_prompt": source, "target_prompts": [target], "steps": 5, "seed": 11}
        job = client.post("/v1/syntheses", json=body).json()
        deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
        while time.monotonic() < deadline:
            answer = client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=10"}).json()
            if answer["status"] == "succeeded":
                return answer
        raise AssertionError(f"job {job['id']} did not finish: {answer}")


def test_history_reloads_a_job_and_its_parameters_after_a_reload(
    page: Page, stack: StackRun
) -> None:
    job = _finished_synthesis(stack, "a dog sitting", "a dog in the history")
    page.reload()  # the key stays in the tab's session storage
    expect(page.get_by_test_id("api-key")).to_have_value(stack.api_key)
    item = page.locator(f'[data-testid=history-item][data-job-id="{job["id"]}"]')
    expect(item).to_contain_text("a dog in the history")
    page.get_by_test_id("source-prompt").fill("something else")
    item.click()

    expect(page.get_by_test_id("source-prompt")).to_have_value("a dog sitting")
    expect(page.get_by_test_id("target-prompt")).to_have_count(1)
    expect(page.get_by_test_id("target-prompt")).to_have_value("a dog in the history")
    expect(page.get_by_test_id("seed")).to_have_value("11")
    expect(page.get_by_test_id("steps")).to_have_value("5")
    expect(page.get_by_test_id("result-image")).to_have_count(2)
    expect(page.locator("#status")).to_have_text("Succeeded.")


def test_a_lora_job_sends_its_ticked_adapter_and_the_history_restores_it(
    page: Page, stack: StackRun, console: Console
) -> None:
    # The stack's tiny model lists one adapter, tiny-style, at the catalog's default weight.
    adapter = api(stack).get("/v1/models").json()["data"][0]["loras"][0]
    name = adapter["name"]
    tick, weight = (
        page.get_by_test_id(f"lora-option-{name}"),
        page.get_by_test_id(f"lora-weight-{name}"),
    )
    page.get_by_test_id("mode").select_option("synthesis")
    page.get_by_test_id("previews").uncheck()
    expect(page.get_by_test_id("lora-field")).to_be_visible()
    expect(tick).not_to_be_checked()
    expect(weight).to_have_value(str(adapter["weight"]).removesuffix(".0"))
    fill_prompts(page, "a cat sitting", "a cat in style")
    page.get_by_test_id("steps").fill("3")
    tick.check()
    # A weight the API refuses: its sentence next to the adapter, not at the top of the form.
    weight.fill("9")
    console.expected_failures = 1  # the 422
    page.get_by_test_id("submit").click()
    error = page.locator('[data-field="loras.0"] [data-testid="error"]')
    expect(error).to_contain_text("weight")
    expect(page.locator(f'[data-field="loras.0"][data-lora="{name}"]')).to_have_count(1)

    weight.fill("0.5")
    page.get_by_test_id("submit").click()
    wait_until_done(page)
    job = api(stack).get(f"/v1/jobs/{job_id_of(page)}").json()
    assert job["input"]["loras"] == [{"name": name, "weight": 0.5}]

    page.reload()
    expect(tick).not_to_be_checked()
    expect(weight).not_to_have_value("0.5")
    page.locator(f'[data-testid=history-item][data-job-id="{job["id"]}"]').click()
    expect(tick).to_be_checked()
    expect(weight).to_have_value("0.5")


UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button, canvas')]
    .filter(el => el.offsetParent !== null)
    .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                  && !(el.tagName === 'BUTTON' && el.textContent.trim()))
    .map(el => el.id || el.outerHTML.slice(0, 80))"""


@pytest.mark.parametrize("mode", ["edit", "synthesis", "sequence"])
def test_every_control_is_labelled_and_the_page_fits_a_phone(page: Page, mode: str) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_test_id("mode").select_option(mode)
    if mode != "sequence":
        page.get_by_test_id("mask-mode").select_option("manual")
    page.get_by_test_id("condition-model").select_option("canny")
    assert page.evaluate(UNLABELLED) == []
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # From the keyboard: the key is the first stop, and a focused control shows an outline.
    page.reload()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.testid") == "api-key"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("none", "")


def test_a_sequence_of_uploaded_frames_gives_frames_and_an_animation(
    page: Page, stack: StackRun
) -> None:
    page.get_by_test_id("mode").select_option("sequence")
    fill_prompts(page, "a knight", "a knight dancing")
    page.get_by_test_id("steps").fill("5")
    page.get_by_test_id("condition-model").select_option("canny")
    page.locator("#condition-preprocess").select_option("canny")
    frames = [
        {"name": f"pose_{i}.png", "mimeType": "image/png", "buffer": png_bytes(64, 64)}
        for i in range(3)
    ]
    page.get_by_test_id("frames-input").set_input_files(frames)
    page.get_by_test_id("submit").click()

    wait_until_done(page)
    # The source, three frames and the animated WebP as images; the MP4 as a video.
    expect(page.get_by_test_id("result-image")).to_have_count(5)
    expect(page.locator("#results video")).to_have_count(1)
    # Both animations at the size of the frames beside them, not the video's own 64 px.
    frame = page.locator("#results img[alt^='frame 0']").bounding_box()
    webp = page.locator("#results img[alt^='animation']").bounding_box()
    video = page.locator("#results video").bounding_box()
    assert frame and webp and video and frame["width"] >= 150
    assert abs(webp["width"] - frame["width"]) < 1 and abs(video["width"] - frame["width"]) < 1
    job = api(stack).get(f"/v1/jobs/{job_id_of(page)}").json()
    assert job["kind"] == "sequence" and job["input"]["condition"]["preprocess"] == "canny"
    assert [i["role"] for i in job["output"]["images"]].count("frame") == 3


def test_a_canny_layout_image_shows_its_edges(page: Page) -> None:
    page.get_by_test_id("mode").select_option("edit")
    page.get_by_test_id("condition-model").select_option("canny")
    page.get_by_test_id("condition-image").set_input_files(str(EXAMPLE))
    preview = page.get_by_test_id("canny-preview")
    expect(preview).to_be_hidden()  # no preprocessing picked yet
    page.locator("#condition-preprocess").select_option("canny")
    expect(preview).to_be_visible()
    page.wait_for_function(
        """() => {
          const canvas = document.querySelector('[data-testid=canny-preview]');
          const { width, height } = canvas;
          const pixels = canvas.getContext('2d').getImageData(0, 0, width, height).data;
          let white = 0;
          for (let i = 0; i < pixels.length; i += 4) if (pixels[i] === 255) white += 1;
          return white > 100 && white < pixels.length / 8;  // edges, not a blank or a copy
        }"""
    )


def _scrolled_to_run(page: Page) -> None:
    page.set_viewport_size({"width": 1280, "height": 900})
    page.get_by_test_id("mode").select_option("synthesis")
    page.get_by_test_id("previews").uncheck()
    fill_prompts(page, "a cat sitting", "a cat running")
    page.get_by_test_id("steps").fill("4")
    page.get_by_test_id("submit").scroll_into_view_if_needed()
    expect(page.locator("#job-panel h2")).not_to_be_in_viewport()


def test_run_brings_the_job_panel_into_view(page: Page) -> None:
    _scrolled_to_run(page)
    page.get_by_test_id("submit").click()
    expect(page.locator("#job-panel h2")).to_be_in_viewport()
    wait_until_done(page)


def test_run_jumps_to_the_job_panel_when_motion_is_reduced(page: Page) -> None:
    page.emulate_media(reduced_motion="reduce")
    _scrolled_to_run(page)
    page.evaluate(
        """() => { window.scrolls = [];
                   addEventListener('scroll', () => window.scrolls.push(scrollY)); }"""
    )
    page.get_by_test_id("submit").click()
    expect(page.locator("#job-panel h2")).to_be_in_viewport()
    wait_until_done(page)
    # One jump: the first position scrolled to is already the last (a smooth scroll passes
    # through positions between).
    scrolls = page.evaluate("window.scrolls")
    assert scrolls and scrolls[0] == scrolls[-1], scrolls


def test_an_error_on_a_target_prompt_leaves_the_prompt_its_width(
    page: Page, console: Console
) -> None:
    page.get_by_test_id("mode").select_option("synthesis")
    fill_prompts(page, "a cat sitting", "a cat running", "   ")
    prompt = page.get_by_test_id("target-prompt").nth(1)
    before = prompt.bounding_box()
    console.expected_failures = 1  # the 422
    page.get_by_test_id("submit").click()

    error = page.locator('[data-field="target_prompts.1"] [data-testid="error"]')
    expect(error).to_be_visible()
    after, under = prompt.bounding_box(), error.bounding_box()
    assert before and after and under and before["width"] > 150
    assert abs(after["width"] - before["width"]) < 1, (before, after)
    assert under["y"] >= after["y"] + after["height"] - 1  # on its own line, under the prompt


def test_an_edit_reloaded_from_the_history_runs_again_with_its_photo_and_masks(
    page: Page, stack: StackRun
) -> None:
    white = data_url(png_bytes(64, 64, (255, 255, 255)))
    with api(stack) as client:
        body = {
            "image": data_url(png_bytes(64, 64)),
            "source_prompt": "a photo",
            "target_prompts": ["a photo in the history"],
            "steps": 4,
            "control": {
                "mask": {"mode": "manual", "regions": [{"source": white, "target": white}]}
            },
        }
        answer = client.post("/v1/edits", json=body)
        assert answer.status_code == 202, answer.text
        first = answer.json()
    page.get_by_role("button", name="Refresh").click()
    page.locator(f'[data-testid=history-item][data-job-id="{first["id"]}"]').click()
    expect(page.get_by_test_id("mode")).to_have_value("edit")
    expect(page.get_by_test_id("reused-photo")).to_be_visible()
    expect(page.get_by_test_id("mask-mode")).to_have_value("manual")
    expect(page.get_by_test_id("reused-masks")).to_be_visible()
    wait_until_done(page)

    page.get_by_test_id("submit").click()
    page.wait_for_function(
        "() => document.querySelector('#job-json') && !/" + first["id"] + "/.test("
        "document.querySelector('#job-json').textContent) && "
        "document.querySelector('#details').hidden === false",
        timeout=JOB_TIMEOUT_MS,
    )
    wait_until_done(page)
    again = api(stack).get(f"/v1/jobs/{job_id_of(page)}").json()
    assert again["id"] != first["id"] and again["kind"] == "edit"
    assert again["input"]["image"] == first["input"]["image"]
    assert again["input"]["control"]["mask"] == first["input"]["control"]["mask"]


def test_a_missing_or_refused_key_is_said_for_people_on_the_page(
    browser: Browser, stack: StackRun
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    uncaught: list[str] = []
    page.on("pageerror", lambda error: uncaught.append(str(error)))
    try:
        page.goto(f"{stack.api_url}/playground")
        expect(page.locator("#model-info")).to_have_text(
            "Enter your API key above to list the models."
        )
        fill_prompts(page, "a cat sitting", "a cat running")
        page.get_by_test_id("submit").click()
        error = page.locator('[data-field="api_key"] [data-testid="error"]')
        expect(error).to_have_text("Enter your API key above to run jobs; make up prints one.")
        expect(page.get_by_test_id("api-key")).to_be_focused()

        page.get_by_test_id("api-key").fill("not-a-key")
        page.get_by_test_id("api-key").press("Tab")
        expect(error).to_contain_text("The gateway does not accept this API key")
        expect(error).not_to_contain_text("Authorization")
    finally:
        context.close()
    assert uncaught == []


def test_a_sequence_on_a_model_without_condition_models_suggests_one_that_has(
    page: Page,
) -> None:
    # The default local stack's toy model has no condition model: a copy of the tiny entry
    # without any stands for it in the gateway's answer.
    def with_a_model_without_conditions(route: Any) -> None:
        response = route.fetch()
        models = response.json()
        toy = {**models["data"][0], "name": "toy-shapes", "conditions": [], "loras": []}
        route.fulfill(
            response=response,
            json={**models, "default": "toy-shapes", "data": [toy, *models["data"]]},
        )

    page.route("**/v1/models", with_a_model_without_conditions)
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/v1/sequences" in r.url else None)
    page.reload()
    expect(page.get_by_test_id("model")).to_have_value("toy-shapes")
    expect(page.get_by_test_id("model-guide")).to_contain_text("tiny")
    expect(page.get_by_test_id("lora-field")).to_contain_text("This model has no LoRA adapters.")
    page.get_by_test_id("mode").select_option("sequence")
    fill_prompts(page, "a knight", "a knight dancing")
    page.get_by_test_id("submit").click()

    error = page.locator('[data-field="model"] [data-testid="error"]')
    expect(error).to_have_text(
        "A sequence follows condition frames, and toy-shapes has no condition model: "
        "choose tiny above (condition models: canny)."
    )
    expect(page.get_by_test_id("model")).to_be_focused()
    assert sent == []
