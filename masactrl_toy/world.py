"""Procedural scenes: one creature with an identity and a pose, on a background, with a caption.

Why the split matters: MasaCtrl copies appearance from the source image into the target through
self-attention. If a caption word pinned the appearance, the text alone would keep it and the
control would have nothing to do; so the caption names only the *pose and layout* (arms, sitting
or standing, facing, position) and the background, while the *identity* (body and pattern colours,
the random stripe or spot layout, the belly marking, the hat's colour) is drawn at random and never
named. Only the source image can supply it.

Everything is a pure function of a seed (``random.Random``), rendered with PIL at any size: the
geometry is defined on a unit square and scaled, so 32 px and 96 px scenes show the same picture.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "Identity",
    "Pose",
    "Scene",
    "caption",
    "random_identity",
    "random_pose",
    "random_scene",
    "render",
    "scene_pair",
    "vocabulary",
]

Colour = tuple[int, int, int]
Arms = Literal["up", "down"]
Stance = Literal["sitting", "standing"]
Facing = Literal["left", "right"]
Position = Literal["left", "right"]

# Background name -> (sky colour, ground colour). Named in captions.
BACKGROUNDS: dict[str, tuple[Colour, Colour]] = {
    "grass": ((150, 200, 240), (60, 150, 60)),
    "snow": ((200, 210, 230), (245, 245, 250)),
    "sand": ((120, 180, 230), (220, 190, 120)),
    "room": ((180, 170, 160), (110, 80, 60)),
}
PATTERNS = ("stripes", "spots", "plain")
_HORIZON = 0.62  # fraction of the height where the ground starts
_BEAK: Colour = (250, 160, 30)  # fixed, so measures can find which way the creature faces


@dataclass(frozen=True)
class Identity:
    """What MasaCtrl should keep: never named by the caption."""

    body: Colour
    pattern: str
    pattern_colour: Colour
    # Stripe offsets (fractions of the body height) or spot centres (fractions of the body box).
    pattern_layout: tuple[tuple[float, float], ...]
    belly: Colour
    hat: Colour | None


@dataclass(frozen=True)
class Pose:
    """What the target prompt changes: every field is named in the caption."""

    arms: Arms
    stance: Stance
    facing: Facing
    position: Position


@dataclass(frozen=True)
class Scene:
    identity: Identity
    pose: Pose
    background: str


def _colour(rng: random.Random) -> Colour:
    # Saturated colours away from the backgrounds' greys, so the creature stands out.
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def random_identity(rng: random.Random) -> Identity:
    """A random creature: colours, a pattern with a random layout, a belly marking, maybe a hat."""
    pattern = rng.choice(PATTERNS)
    if pattern == "stripes":
        layout = tuple(
            (rng.uniform(0.1, 0.9), rng.uniform(0.06, 0.14)) for _ in range(rng.randint(2, 4))
        )
    elif pattern == "spots":
        layout = tuple(
            (rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)) for _ in range(rng.randint(2, 5))
        )
    else:
        layout = ()
    return Identity(
        body=_colour(rng),
        pattern=pattern,
        pattern_colour=_colour(rng),
        pattern_layout=layout,
        belly=_colour(rng),
        hat=_colour(rng) if rng.random() < 0.5 else None,
    )


def random_pose(rng: random.Random) -> Pose:
    return Pose(
        arms=rng.choice(("up", "down")),
        stance=rng.choice(("sitting", "standing")),
        facing=rng.choice(("left", "right")),
        position=rng.choice(("left", "right")),
    )


def random_scene(seed: int) -> Scene:
    """The scene for `seed`: same seed, same scene."""
    rng = random.Random(seed)
    return Scene(random_identity(rng), random_pose(rng), rng.choice(sorted(BACKGROUNDS)))


def scene_pair(seed: int) -> tuple[Scene, Scene]:
    """A source scene and a target with the same identity and background but another pose.

    At least one captioned pose attribute differs, so the pair is an edit to measure.
    """
    source = random_scene(seed)
    rng = random.Random(seed + 1_000_003)
    while True:
        pose = random_pose(rng)
        if pose != source.pose:
            return source, replace(source, pose=pose)


def caption(scene: Scene) -> str:
    """The scene's caption: pose, layout and background only (see the module docstring)."""
    p = scene.pose
    return (
        f"a creature with arms {p.arms} {p.stance} facing {p.facing} "
        f"on {scene.background} on the {p.position}"
    )


def vocabulary() -> list[str]:
    """Every word a caption can use (the tokenizer gives each one token)."""
    words = {"a", "creature", "with", "arms", "up", "down", "sitting", "standing", "facing"}
    words |= {"left", "right", "on", "the", *BACKGROUNDS}
    return sorted(words)


def render(scene: Scene, size: int = 64) -> tuple[Image.Image, np.ndarray]:
    """Draw the scene at `size`×`size` px; returns the RGB image and the creature's boolean mask."""
    # Draw at 4x and downsample: antialiased edges keep small renders legible.
    big = size * 4
    sky, ground = BACKGROUNDS[scene.background]
    image = Image.new("RGB", (big, big), sky)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(big * _HORIZON), big, big), fill=ground)
    mask = Image.new("L", (big, big), 0)
    _draw_creature(scene, big, image, [draw, ImageDraw.Draw(mask)])
    image = image.resize((size, size), Image.Resampling.BOX)
    small_mask = np.asarray(mask.resize((size, size), Image.Resampling.BOX)) >= 128
    return image, small_mask


def _draw_creature(
    scene: Scene, s: int, image: Image.Image, draws: list[ImageDraw.ImageDraw]
) -> None:
    ident, pose = scene.identity, scene.pose
    colour_draw, mask_draw = draws
    cx = 0.3 if pose.position == "left" else 0.7
    # Sitting lowers the body and folds the legs forward.
    body_top, body_bottom = (0.42, 0.78) if pose.stance == "sitting" else (0.28, 0.64)
    half_w = 0.13
    body = (cx - half_w, body_top, cx + half_w, body_bottom)
    side = -1 if pose.facing == "left" else 1
    head_r = 0.085
    head_c = (cx + side * 0.03, body_top - head_r * 0.8)
    limb = max(1, round(s * 0.035))

    def px(box: tuple[float, ...]) -> list[float]:
        return [v * s for v in box]

    def both(kind: str, box: tuple[float, ...], fill: Colour, width: int = 0) -> None:
        for d, f in ((colour_draw, fill), (mask_draw, 255)):
            if kind == "ellipse":
                d.ellipse(px(box), fill=f)
            elif kind == "line":
                d.line(px(box), fill=f, width=width)
            else:
                d.rectangle(px(box), fill=f)

    # Legs.
    if pose.stance == "standing":
        for dx in (-0.06, 0.06):
            both("line", (cx + dx, body_bottom - 0.02, cx + dx, 0.86), ident.body, limb)
    else:
        for dy in (-0.02, 0.02):
            foot = cx + side * 0.2
            both("line", (cx, body_bottom - 0.04 + dy, foot, body_bottom + dy), ident.body, limb)
    # Arms from the shoulders.
    shoulder_y = body_top + 0.07
    for sx in (-1, 1):
        x0 = cx + sx * half_w * 0.9
        end_y = shoulder_y - 0.17 if pose.arms == "up" else shoulder_y + 0.17
        both("line", (x0, shoulder_y, x0 + sx * 0.08, end_y), ident.body, limb)
    both("ellipse", body, ident.body)
    _draw_pattern(image, ident, body, s)
    # Belly marking, shifted toward the facing side.
    bw, bh = half_w * 0.55, (body_bottom - body_top) * 0.3
    bx, by = cx + side * 0.03, body_top + (body_bottom - body_top) * 0.62
    colour_draw.ellipse(px((bx - bw, by - bh, bx + bw, by + bh)), fill=ident.belly)
    # Head with an eye and a beak on the facing side.
    hx, hy = head_c
    both("ellipse", (hx - head_r, hy - head_r, hx + head_r, hy + head_r), ident.body)
    eye = 0.022
    ex = hx + side * head_r * 0.45
    colour_draw.ellipse(px((ex - eye, hy - eye * 1.5, ex + eye, hy + eye * 0.5)), fill=(0, 0, 0))
    tip = hx + side * (head_r + 0.07)
    beak = [
        (hx + side * head_r * 0.8, hy - 0.02),
        (tip, hy + 0.01),
        (hx + side * head_r, hy + 0.04),
    ]
    for d, f in ((colour_draw, _BEAK), (mask_draw, 255)):
        d.polygon([(x * s, y * s) for x, y in beak], fill=f)
    if ident.hat is not None:
        both("rectangle", (hx - 0.05, hy - head_r - 0.07, hx + 0.05, hy - head_r + 0.01), ident.hat)


def _draw_pattern(image: Image.Image, ident: Identity, body: tuple[float, ...], s: int) -> None:
    x0, y0, x1, y1 = body
    # Clip the pattern to the body's ellipse by drawing into a mask layer first.
    layer = Image.new("L", (s, s), 0)
    layer_draw = ImageDraw.Draw(layer)
    if ident.pattern == "stripes":
        for offset, thickness in ident.pattern_layout:
            y = y0 + offset * (y1 - y0)
            layer_draw.rectangle(
                [
                    x0 * s,
                    (y - thickness / 2 * (y1 - y0)) * s,
                    x1 * s,
                    (y + thickness / 2 * (y1 - y0)) * s,
                ],
                fill=255,
            )
    elif ident.pattern == "spots":
        r = 0.12 * (x1 - x0)
        for fx, fy in ident.pattern_layout:
            x, y = x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)
            layer_draw.ellipse([(x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s], fill=255)
    else:
        return
    body_mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(body_mask).ellipse([v * s for v in body], fill=255)
    clipped = Image.fromarray(np.minimum(np.asarray(layer), np.asarray(body_mask)))
    # ImageDraw has no clip mask; paste the colour through the clipped mask instead.
    image.paste(ident.pattern_colour, (0, 0, s, s), clipped)
