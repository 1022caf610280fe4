"""``masactrl client sequence``: frames through the local stack, and misuse refused up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from masactrl_cli.main import main
from masactrl_jobs.media import encode_mp4, probe_video
from tests.conftest import free_port
from tests.masactrl_cli.conftest import REPO_ROOT, StackRun
from tests.masactrl_jobs.test_media import webp_facts

SAMPLE = REPO_ROOT / "examples/house-and-cat.png"


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    return lines[0]


def _layouts(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    paths = []
    # Written out of name order: the folder is read sorted by name, not by creation.
    for k in reversed(range(count)):
        path = folder / f"pose_{k:02d}.png"
        Image.effect_noise((64, 64), 30 + 20 * k).convert("RGB").save(path)
        paths.append(path)
    (folder / "README.txt").write_text("not a frame")
    return sorted(paths)


@pytest.mark.slow
def test_a_sequence_from_a_folder_downloads_frames_and_animations(
    local_stack: StackRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--api-url", local_stack.api_url, "--api-key", local_stack.api_key]
    _layouts(tmp_path / "poses", 3)
    out = tmp_path / "out"
    status = main(
        ["client", "sequence", "--source-prompt", "a house", "--target-prompt", "a snowy house"]
        + ["--condition-model", "canny", "--frames", str(tmp_path / "poses")]
        + ["--steps", "3", "--seed", "5", "--animation-fps", "5", "--out", str(out), "--quiet"]
        + flags
    )
    assert status == 0, capsys.readouterr().err
    job = json.loads((out / "job.json").read_text())
    assert job["kind"] == "sequence" and job["status"] == "succeeded"
    names = sorted(path.name for path in out.iterdir())
    assert names == [
        "frame_0.png",
        "frame_1.png",
        "frame_2.png",
        "job.json",
        "sequence.mp4",
        "sequence.webp",
        "source_0.png",
    ]
    info = probe_video((out / "sequence.mp4").read_bytes())
    assert (info.frame_count, round(info.fps)) == (3, 5)
    assert webp_facts((out / "sequence.webp").read_bytes())[0] == 3


@pytest.mark.slow
def test_a_sequence_from_a_video_with_canny(
    local_stack: StackRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--api-url", local_stack.api_url, "--api-key", local_stack.api_key]
    with Image.open(SAMPLE) as sample:
        frames = [
            sample.convert("RGB").resize((64 + 16 * k, 64)).resize((96, 64)) for k in range(4)
        ]
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode_mp4(frames, 4.0))
    out = tmp_path / "out"
    status = main(
        ["client", "sequence", "--image", str(SAMPLE), "--anchor-source"]
        + ["--target-prompt", "a snowy house", "--condition-model", "canny"]
        + ["--video", str(clip), "--fps", "2", "--max-frames", "2"]
        + ["--condition-preprocess", "canny", "--steps", "3", "--out", str(out), "--quiet"]
        + flags
    )
    assert status == 0, capsys.readouterr().err
    job = json.loads((out / "job.json").read_text())
    condition = job["input"]["condition"]
    assert (condition["fps"], condition["max_frames"], condition["preprocess"]) == (2, 2, "canny")
    assert job["input"]["anchor_source"] is True
    assert sorted(path.name for path in out.glob("frame_*.png")) == ["frame_0.png", "frame_1.png"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frame", "missing.png"], "image file missing.png does not exist"),
        (["--frame", str(SAMPLE), "--fps", "2"], "--fps and --max-frames sample a video"),
        (["--frame", str(SAMPLE), "--anchor-source"], "--anchor-source needs --image"),
        (["--video", "missing.mp4"], "video file missing.mp4 does not exist"),
        (["--frames", "no-such-folder"], "is not a folder"),
    ],
)
def test_sequence_misuse_fails_before_any_request(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would be exit 1
    common = ["--source-prompt", "a", "--target-prompt", "b", "--condition-model", "canny"]
    assert main(["client", "sequence", *common, "--api-url", url, "--api-key", "k", *argv]) == 2
    assert message in _one_line(capsys.readouterr().err)


def test_frames_and_a_video_together_are_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["client", "sequence", "--source-prompt", "a", "--target-prompt", "b"]
    argv += ["--condition-model", "canny", "--frame", str(SAMPLE), "--video", str(SAMPLE)]
    assert main(argv) == 2
    assert "--video: not allowed with argument --frame" in _one_line(capsys.readouterr().err)
