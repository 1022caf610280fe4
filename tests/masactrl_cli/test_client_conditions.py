"""``masactrl client`` with a layout condition: through the local stack's ``canny`` ControlNet,
and condition misuse refused before any request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from masactrl_cli.main import main
from tests.conftest import free_port
from tests.masactrl_cli.conftest import REPO_ROOT, StackRun

SAMPLE = REPO_ROOT / "examples/house-and-cat.png"


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    return lines[0]


@pytest.mark.slow
def test_a_canny_anchored_edit_through_the_stack(
    local_stack: StackRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--api-url", local_stack.api_url, "--api-key", local_stack.api_key]
    assert main(["client", "models", *flags]) == 0
    [model] = json.loads(capsys.readouterr().out)["data"]
    assert model["conditions"] == [{"name": "canny", "kind": "controlnet", "family": "sd"}]

    out = tmp_path / "out"
    status = main(
        ["client", "edit", "--image", str(SAMPLE), "--target-prompt", "a snowy house"]
        + ["--condition-model", "canny", "--condition-image", str(SAMPLE)]
        + ["--condition-preprocess", "canny", "--condition-end", "0.8", "--anchor-source"]
        + ["--steps", "3", "--out", str(out), "--quiet", *flags]
    )
    assert status == 0, capsys.readouterr().err
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "succeeded"
    assert job["input"]["anchor_source"] is True
    condition = job["input"]["condition"]
    assert (condition["model"], condition["preprocess"], condition["end"]) == (
        "canny",
        "canny",
        0.8,
    )
    assert job["metrics"]["condition_evals"] > 0
    assert (out / "target_0.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--condition-image", str(SAMPLE)], "--condition-image needs --condition-model"),
        (
            ["--condition-model", "canny", "--condition-image", "missing.png"],
            "cannot read condition image 0 missing.png",
        ),
        (
            ["--condition-model", "canny", "--condition-image", str(SAMPLE)]
            + ["--source-condition-image", str(SAMPLE)],
            "--source-condition-image applies only to synthesize",
        ),
        (
            ["--condition-model", "canny", "--condition-image", str(SAMPLE)]
            + ["--condition-start", "0.6", "--condition-end", "0.4"],
            "start must be less than end",
        ),
    ],
)
def test_condition_misuse_fails_before_any_request(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would be exit 1
    common = ["--target-prompt", "b", "--api-url", url, "--api-key", "k"]
    assert main(["client", "edit", "--image", str(SAMPLE), *common, *argv]) == 2
    assert message in _one_line(capsys.readouterr().err)
