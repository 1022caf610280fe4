"""Writes ``examples/dance.mp4``, the README's sequence example: eight toy-world renders of one
creature dancing (arms up and down, sitting and standing, turning, moving across), 64 px at 4 fps.

Run from the repository root: ``.venv/bin/python examples/dance.py``. Its frames are the layouts
a sequence follows (their canny edge maps on the stack's tiny model); the file is committed, so
this runs again only to change it.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import product
from pathlib import Path

from PIL import Image

from masactrl_jobs.media import encode_mp4
from masactrl_toy.world import Pose, random_scene, render

OUT = Path(__file__).with_name("dance.mp4")
FPS = 4
SIZE = 64
# The scene of the first toy example pair (examples/toy-scene.png), its creature and background.
SCENE_SEED = 1


def frames() -> list[Image.Image]:
    """The renders, one pose each: every combination of arms and stance, facing one way then the
    other while crossing from the left to the right."""
    scene = random_scene(SCENE_SEED)
    poses = [
        Pose(arms=arms, stance=stance, facing=facing, position=position)
        for (facing, position), (stance, arms) in product(
            (("right", "left"), ("left", "right")),
            (("sitting", "down"), ("sitting", "up"), ("standing", "up"), ("standing", "down")),
        )
    ]
    return [render(replace(scene, pose=pose), SIZE)[0] for pose in poses]


if __name__ == "__main__":
    OUT.write_bytes(encode_mp4(frames(), FPS))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
