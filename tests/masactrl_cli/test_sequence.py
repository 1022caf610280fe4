"""``masactrl sequence``: frames from files, a folder or a video; outputs; costs; misuse.

The CLI's frames must be exactly ``engine.sequence``'s on the same condition frames (PNG is
lossless), in the order given (files) or by name (folder); the animations must hold every frame
at the requested rate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageSequence

from masactrl_cli.main import main
from masactrl_jobs.media import VideoBudget, decode_video, encode_mp4, probe_video

BUDGET = VideoBudget.defaults(120)  # the settings' default budget, the engine's frame limit

STEPS = 2
SIZE = ["--width", "64", "--height", "64"]
SOURCE, TARGET = "a cat sitting", "a cat running"


def layout(k: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A condition frame: a white bar whose place depends on ``k`` (frames must differ)."""
    image = Image.new("RGB", size)
    left = 6 + 10 * k
    image.paste((255, 255, 255), (left, 8, left + 12, size[1] - 8))
    return image


@pytest.fixture(scope="module")
def controlnet(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from masactrl_core.tiny_conditions import write_tiny_condition_model

    folder = tmp_path_factory.mktemp("seq-controlnet") / "controlnet"
    write_tiny_condition_model(folder, kind="controlnet", base=tiny_checkpoint, seed=1)
    return folder


@pytest.fixture(scope="module")
def frame_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("frames")
    paths = []
    for k in range(3):
        paths.append(folder / f"layout_{k}.png")
        layout(k).save(paths[-1])
    return paths


def _argv(model: Path, controlnet: Path, out: Path, *frames: str) -> list[str]:
    argv = ["sequence", "--model", str(model), "--source-prompt", SOURCE]
    argv += ["--target-prompt", TARGET, "--condition-model", str(controlnet), *frames]
    argv += ["--steps", str(STEPS), "--start-step", "1", "--seed", "5", *SIZE, "--quiet"]
    return [*argv, "--out", str(out)]


def _pixels(path: Path) -> np.ndarray[Any, Any]:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _frames_of(out: Path, count: int) -> list[np.ndarray[Any, Any]]:
    return [_pixels(out / f"frame_{k:03d}.png") for k in range(count)]


def _webp_frames(path: Path) -> list[tuple[np.ndarray[Any, Any], int]]:
    """Each frame of an animated WebP with its duration in milliseconds."""
    with Image.open(path) as image:
        frames = []
        for frame in ImageSequence.Iterator(image):
            frame.load()  # the duration is known once the frame is read
            frames.append((np.asarray(frame.convert("RGB")), frame.info["duration"]))
        return frames


@pytest.fixture(scope="module")
def file_run(
    tiny_checkpoint: Path,
    controlnet: Path,
    frame_files: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    # Played in the order 2, 0, 1: not the files' name order.
    out = tmp_path_factory.mktemp("seq-files") / "out"
    order = [frame_files[2], frame_files[0], frame_files[1]]
    frames = [arg for path in order for arg in ("--frame", str(path))]
    assert main(_argv(tiny_checkpoint, controlnet, out, *frames)) == 0
    return out


def test_a_three_frame_run_writes_every_output_and_records_its_costs(
    file_run: Path, frame_files: list[Path], controlnet: Path
) -> None:
    names = {path.name for path in file_run.iterdir()}
    assert names == {
        "source.png",
        "frame_000.png",
        "frame_001.png",
        "frame_002.png",
        "sequence.mp4",
        "sequence.webp",
        "run.json",
    }
    run = json.loads((file_run / "run.json").read_text())
    assert run["command"] == "sequence"
    assert run["frame_count"] == 3
    assert run["fps"] == 8.0
    assert run["frames"] == {
        "files": [str(frame_files[k]) for k in (2, 0, 1)],
        "count": 3,
    }
    assert run["condition"]["model"] == str(controlnet)
    assert run["source_prompt"] == SOURCE and run["target_prompts"] == [TARGET]
    assert (run["seed"], run["steps"], run["start_step"]) == (5, STEPS, 1)
    assert run["outputs"]["frames"] == ["frame_000.png", "frame_001.png", "frame_002.png"]
    # The source prompt differs from the (empty) negative prompt: S × (2 + 2K) UNet images;
    # the ControlNet runs on the frames' rows of both guidance halves: S × 2K.
    assert run["unet_image_evals"] == STEPS * (2 + 2 * 3)
    assert run["condition_evals"] == STEPS * 2 * 3
    assert set(run["timings"]) >= {"load_seconds", "denoise_seconds", "total_seconds"}


def test_the_animations_hold_every_frame_at_the_rate(file_run: Path) -> None:
    mp4 = (file_run / "sequence.mp4").read_bytes()
    info = probe_video(mp4)
    assert info.frame_count == 3
    assert info.fps == pytest.approx(8.0)
    assert len(decode_video(mp4, budget=BUDGET)) == 3
    webp = _webp_frames(file_run / "sequence.webp")
    assert [duration for _, duration in webp] == [125, 125, 125]
    # Lossless: the animation's frames are the PNGs.
    for (pixels, _), written in zip(webp, _frames_of(file_run, 3), strict=True):
        assert np.array_equal(pixels, written)


def test_frames_equal_engine_sequence_in_the_given_order(
    file_run: Path, tiny_checkpoint: Path, controlnet: Path, frame_files: list[Path]
) -> None:
    from masactrl_core import Condition, ControlConfig, MasaCtrlEngine

    run = json.loads((file_run / "run.json").read_text())
    engine = MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")
    model = engine.load_condition_model(controlnet)
    result = engine.sequence(
        SOURCE,
        TARGET,
        Condition(model, [Image.open(frame_files[k]).convert("RGB") for k in (2, 0, 1)]),
        seed=5,
        steps=STEPS,
        width=64,
        height=64,
        control=ControlConfig(start_step=1, start_layer=run["start_layer"]),
    )
    written = _frames_of(file_run, 3)
    for frame, expected in zip(written, result.frames, strict=True):
        assert np.array_equal(frame, np.asarray(expected))
    assert np.array_equal(_pixels(file_run / "source.png"), np.asarray(result.source))
    # The layouts differ, so the frames do: the order above is a real check.
    assert not np.array_equal(written[0], written[1])


def test_a_frame_folder_is_read_in_name_order(
    tiny_checkpoint: Path, controlnet: Path, file_run: Path, frame_files: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    # Names sort as 2, 0, 1 (the file run's order); written in another order; a note is skipped.
    for name, k in (("b.png", 0), ("c.png", 1), ("a.png", 2)):
        layout(k).save(folder / name)
    (folder / "notes.txt").write_text("not a frame")
    out = tmp_path / "out"
    assert (
        main([*_argv(tiny_checkpoint, controlnet, out, "--frames", str(folder)), "--fps", "4"]) == 0
    )
    run = json.loads((out / "run.json").read_text())
    assert run["frames"] == {"folder": str(folder), "count": 3}
    assert run["fps"] == 4.0
    for frame, expected in zip(_frames_of(out, 3), _frames_of(file_run, 3), strict=True):
        assert np.array_equal(frame, expected)
    assert probe_video((out / "sequence.mp4").read_bytes()).fps == pytest.approx(4.0)


def test_a_video_is_sampled_and_round_trips_to_an_animation(
    tiny_checkpoint: Path, controlnet: Path, tmp_path: Path
) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(encode_mp4([layout(k % 5) for k in range(10)], fps=10))
    out = tmp_path / "out"
    argv = _argv(tiny_checkpoint, controlnet, out, "--video", str(video))
    argv += ["--fps", "5", "--max-frames", "3", "--condition-preprocess", "canny"]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    # 10 frames at 10 fps sampled at 5 fps: 5 frames, capped at 3.
    assert run["frame_count"] == 3
    assert run["fps"] == 5.0
    assert run["frames"]["video"] == str(video)
    assert (run["frames"]["sampling_fps"], run["frames"]["max_frames"]) == (5.0, 3)
    assert run["frames"]["video_fps"] == pytest.approx(10.0)
    assert run["condition"]["preprocess"] == "canny"
    assert run["condition_evals"] == STEPS * 2 * 3
    mp4 = (out / "sequence.mp4").read_bytes()
    assert probe_video(mp4).fps == pytest.approx(5.0)
    assert len(decode_video(mp4, budget=BUDGET)) == 3
    assert len(_webp_frames(out / "sequence.webp")) == 3


def test_a_video_keeps_its_own_rate_without_fps(
    tiny_checkpoint: Path, controlnet: Path, tmp_path: Path
) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(encode_mp4([layout(k) for k in range(2)], fps=12))
    out = tmp_path / "out"
    assert main(_argv(tiny_checkpoint, controlnet, out, "--video", str(video))) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["frame_count"] == 2
    assert run["fps"] == pytest.approx(12.0)


def test_a_photo_source_is_inverted_and_anchored(
    tiny_checkpoint: Path, controlnet: Path, frame_files: list[Path], tmp_path: Path
) -> None:
    photo = tmp_path / "photo.png"
    Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(photo)
    out = tmp_path / "out"
    argv = ["sequence", "--model", str(tiny_checkpoint), "--image", str(photo), "--anchor-source"]
    argv += ["--target-prompt", TARGET, "--condition-model", str(controlnet)]
    argv += ["--frame", str(frame_files[0]), "--frame", str(frame_files[1])]
    argv += ["--steps", str(STEPS), "--start-step", "1", *SIZE, "--quiet", "--out", str(out)]
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["anchor_source"] is True
    assert run["image"]["path"] == str(photo) and run["image"]["size"] == [64, 64]
    assert run["source_prompt"] == ""
    assert run["frame_count"] == 2
    assert run["timings"]["inversion_seconds"] > 0
    assert (out / "frame_001.png").is_file() and (out / "sequence.webp").is_file()


# --- bad input: one line, exit 2, nothing written ----------------------------------------------


def _bad_inputs(tmp: Path, model: Path, controlnet: Path, frame: Path) -> dict[str, list[str]]:
    (tmp / "notes.txt").write_text("not an image")
    (tmp / "empty").mkdir()
    layout(0, (48, 64)).save(tmp / "narrow.png")
    long_video = tmp / "long.mp4"
    long_video.write_bytes(
        encode_mp4([Image.new("RGB", (16, 16), (k, 0, 0)) for k in range(121)], 30)
    )
    head = ["sequence", "--model", str(model), "--target-prompt", TARGET]
    cond = ["--condition-model", str(controlnet)]
    tail = ["--steps", str(STEPS), "--out", str(tmp / "o")]
    one = ["--frame", str(frame)]
    src = ["--source-prompt", SOURCE]
    return {
        "no frame source": [*head, *src, *cond, *tail],
        "empty frame folder": [*head, *src, *cond, "--frames", str(tmp / "empty"), *tail],
        "unreadable frame": [*head, *src, *cond, *one, "--frame", str(tmp / "notes.txt"), *tail],
        "missing frame": [*head, *src, *cond, "--frame", str(tmp / "absent.png"), *tail],
        "unreadable video": [*head, *src, *cond, "--video", str(tmp / "notes.txt"), *tail],
        "missing video": [*head, *src, *cond, "--video", str(tmp / "absent.mp4"), *tail],
        "too many frames": [*head, *src, *cond, *(one * 121), *tail],
        "too long a video": [*head, *src, *cond, "--video", str(long_video), *tail],
        "mixed sizes": [*head, *src, *cond, *one, "--frame", str(tmp / "narrow.png"), *tail],
        "files and a folder": [*head, *src, *cond, *one, "--frames", str(tmp), *tail],
        "no source": [*head, *cond, *one, *tail],
        "anchor without an image": [*head, *src, *cond, *one, "--anchor-source", *tail],
        "max frames without a video": [*head, *src, *cond, *one, "--max-frames", "2", *tail],
        "zero fps": [*head, *src, *cond, *one, "--fps", "0", *tail],
        "two prompts for three frames": [
            *head,
            "--target-prompt",
            "a dog",
            *src,
            *cond,
            *(one * 3),
            *tail,
        ],
        "no condition model": [*head, *src, *one, *tail],
        "scale without a model": [*head, *src, *one, "--condition-scale", "0.5", *tail],
        "negative scale": [*head, *src, *cond, *one, "--condition-scale", "-1", *tail],
        "canny thresholds without canny": [*head, *src, *cond, *one, "--canny-low", "10", *tail],
        "unreadable source image": [
            *head,
            "--image",
            str(tmp / "notes.txt"),
            *cond,
            *one,
            *tail,
        ],
    }


CASES = [
    ("no frame source", "one of the arguments --frame --frames --video is required"),
    ("empty frame folder", "holds no image files"),
    ("unreadable frame", "is not a readable image"),
    ("missing frame", "does not exist"),
    ("unreadable video", "cannot be read as a video"),
    ("missing video", "does not exist"),
    ("too many frames", "at most 120 frames, got 121"),
    ("too long a video", "at most 120 frames and the video gives more (use --max-frames"),
    ("mixed sizes", "different sizes (64x64, 48x64); give a target size"),
    ("files and a folder", "not allowed with argument"),
    ("no source", "give the source: --source-prompt, or --image"),
    ("anchor without an image", "--anchor-source needs --image"),
    ("max frames without a video", "--max-frames applies only to --video"),
    ("zero fps", "0.0 is not a positive number"),
    ("two prompts for three frames", "one per frame (3), got 2"),
    ("no condition model", "a sequence needs --condition-model"),
    ("scale without a model", "--condition-scale needs --condition-model"),
    ("negative scale", "--condition-scale: condition scale must not be negative"),
    ("canny thresholds without canny", "apply only to --condition-preprocess canny"),
    ("unreadable source image", "is not an image file"),
]


@pytest.mark.parametrize(("case", "message"), CASES)
def test_bad_input_is_one_line_and_exit_2(
    case: str,
    message: str,
    tiny_checkpoint: Path,
    controlnet: Path,
    frame_files: list[Path],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    argv = _bad_inputs(tmp_path, tiny_checkpoint, controlnet, frame_files[0])[case]
    assert main(argv) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    assert "sequence" in lines[0] and "error: " in lines[0]
    assert message in lines[0]
    assert not (tmp_path / "o" / "run.json").exists()
