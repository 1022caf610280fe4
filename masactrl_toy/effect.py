"""MasaCtrl's effect on a toy-world checkpoint, measured: identity consistency and pose compliance.

Synthesis: for each scene pair (a source caption and a target caption that changes the pose) and
noise seed, the engine draws the source and the target from the same noise with a given control.
Editing: the *rendered* source scene is inverted and edited to the target caption, so the
identity can only come from the photo (the inverted noise of a 32 px render does not carry it).

Scores of one (source, target) image pair, all analytic (``masactrl_toy.measures``):

- ``consistency``: 1 - the colour-histogram distance between the source's creature and the
  target's (each found as the pixels far from its background): 1 is the same colours.
- ``colour``: distance between the creatures' mean colours, as a fraction of RGB's diagonal.
- ``image``: the colour-histogram distance of the whole images (the issue's coarse outside check).
- ``compliance``: the fraction of the target caption's pose attributes (position, facing, stance,
  arms) that ``read_pose`` reads in the target.
- ``change``: the same over the attributes the target caption *changes* only: a target that
  copies its source scores 0 here however well it scores above.

In-place edits (``in_place_edit_effect``): a rendered scene edited to the same scene with one pose
attribute flipped (arms, stance, facing, or position: the last a move across the picture, the
others a change where the creature stands). The renderer draws the ground-truth target, so
whether the edit follows the prompt is a pixel distance, with no reading of poses at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from statistics import mean
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from masactrl_toy.measures import foreground_mask, histogram_distance, pose_compliance
from masactrl_toy.world import Scene, caption, random_scene, render, scene_pair

if TYPE_CHECKING:
    from masactrl_core import ControlConfig, MasaCtrlEngine

__all__ = [
    "POSE_ATTRIBUTES",
    "EditEffect",
    "Scores",
    "edit_scores",
    "flip",
    "in_place_edit_effect",
    "pair_scores",
    "pixel_distance",
    "synthesis_scores",
    "total_variation",
]

# Every captioned pose attribute with its two values (masactrl_toy.world.Pose).
POSE_ATTRIBUTES: dict[str, tuple[str, str]] = {
    "arms": ("up", "down"),
    "stance": ("sitting", "standing"),
    "facing": ("left", "right"),
    "position": ("left", "right"),
}


@dataclass(frozen=True)
class Scores:
    consistency: float
    colour: float
    image: float
    compliance: float
    change: float

    @staticmethod
    def average(scores: Iterable[Scores]) -> Scores:
        items = list(scores)
        return Scores(**{key: mean(getattr(s, key) for s in items) for key in asdict(items[0])})


def pair_scores(source: Image.Image, target: Image.Image, pair: tuple[Scene, Scene]) -> Scores:
    """The scores of one drawn (source, target) against the scene pair they were asked for."""
    source_scene, target_scene = pair
    mask_a = foreground_mask(source, source_scene.background)
    mask_b = foreground_mask(target, target_scene.background)
    wanted, before = asdict(target_scene.pose), asdict(source_scene.pose)
    changed = {key: value for key, value in wanted.items() if before[key] != value}
    return Scores(
        consistency=1.0 - histogram_distance(source, target, mask_a, mask_b),
        colour=_mean_colour_distance(source, target, mask_a, mask_b),
        image=histogram_distance(source, target),
        compliance=pose_compliance(target, asdict(target_scene.pose), target_scene.background),
        change=pose_compliance(target, changed, target_scene.background),
    )


def _mean_colour_distance(
    a: Image.Image, b: Image.Image, mask_a: np.ndarray, mask_b: np.ndarray
) -> float:
    if not mask_a.any() or not mask_b.any():
        return 1.0
    colour_a = np.asarray(a.convert("RGB"), np.float64)[mask_a].mean(axis=0)
    colour_b = np.asarray(b.convert("RGB"), np.float64)[mask_b].mean(axis=0)
    return float(np.linalg.norm(colour_a - colour_b) / np.linalg.norm([255.0] * 3))


def synthesis_scores(
    engine: MasaCtrlEngine,
    pairs: Iterable[int],
    seeds: Iterable[int],
    control: ControlConfig,
    *,
    steps: int = 50,
    guidance_scale: float = 7.5,
) -> Scores:
    """Mean scores of consistent synthesis over scene pairs × noise seeds with ``control``."""
    scores = []
    for pair_seed in pairs:
        pair = scene_pair(pair_seed)
        for seed in seeds:
            result = engine.synthesize(
                caption(pair[0]),
                [caption(pair[1])],
                seed=seed,
                steps=steps,
                guidance_scale=guidance_scale,
                control=control,
            )
            scores.append(pair_scores(result.source, result.targets[0], pair))
    return Scores.average(scores)


def edit_scores(
    engine: MasaCtrlEngine,
    pairs: Iterable[int],
    control: ControlConfig,
    *,
    steps: int = 50,
    guidance_scale: float = 7.5,
    anchor_source: bool = False,
) -> Scores:
    """Mean scores of real-image edits of rendered source scenes (the render is the source)."""
    scores = []
    for pair_seed in pairs:
        pair = scene_pair(pair_seed)
        photo, _ = render(pair[0], engine.native_size[0])
        result = engine.edit(
            photo,
            [caption(pair[1])],
            source_prompt=caption(pair[0]),
            steps=steps,
            guidance_scale=guidance_scale,
            control=control,
            anchor_source=anchor_source,
        )
        scores.append(pair_scores(photo, result.targets[0], pair))
    return Scores.average(scores)


def flip(scene: Scene, attribute: str) -> Scene:
    """The same scene with one pose attribute set to its other value."""
    first, second = POSE_ATTRIBUTES[attribute]
    other = second if getattr(scene.pose, attribute) == first else first
    change: dict[str, Any] = {attribute: other}  # one of the pose's literal-typed fields
    return replace(scene, pose=replace(scene.pose, **change))


def pixel_distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute RGB difference of two same-sized images, as a fraction of 255."""
    pixels_a = np.asarray(a.convert("RGB"), np.float64)
    pixels_b = np.asarray(b.convert("RGB"), np.float64)
    return float(np.abs(pixels_a - pixels_b).mean() / 255.0)


@dataclass(frozen=True)
class EditEffect:
    """Means over the edited scenes of one attribute's flip with one control.

    ``image``: whole-image colour-histogram distance source render -> edited target (the
    coarse check's measure; lower keeps more of the source). ``to_truth`` / ``to_source``: pixel
    distance of the edited target to the rendered ground-truth target / to the source render;
    ``follows`` is the share of scenes whose target lies nearer the ground truth than the source.
    """

    image: float
    to_truth: float
    to_source: float
    follows: float


def in_place_edit_effect(
    engine: MasaCtrlEngine,
    scene_seeds: Iterable[int],
    attribute: str,
    control: ControlConfig,
    *,
    steps: int = 50,
    guidance_scale: float = 7.5,
) -> EditEffect:
    """Edit the render of each ``random_scene(seed)`` to the caption with ``attribute`` flipped."""
    rows = []
    for seed in scene_seeds:
        source = random_scene(seed)
        target = flip(source, attribute)
        size = engine.native_size[0]
        photo, _ = render(source, size)
        truth, _ = render(target, size)
        edited = engine.edit(
            photo,
            [caption(target)],
            source_prompt=caption(source),
            steps=steps,
            guidance_scale=guidance_scale,
            control=control,
        ).targets[0]
        to_truth, to_source = pixel_distance(edited, truth), pixel_distance(edited, photo)
        rows.append((histogram_distance(photo, edited), to_truth, to_source, to_truth < to_source))
    return EditEffect(*(mean(float(row[i]) for row in rows) for i in range(4)))


def total_variation(image: Image.Image) -> float:
    """Mean absolute difference of neighbouring pixels, in [0, 1]: noise is high, drawings low."""
    pixels = np.asarray(image.convert("RGB"), np.float64) / 255.0
    return float(
        (np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean()) / 2
    )


def describe(scores: Scores) -> dict[str, Any]:
    return {key: round(value, 4) for key, value in asdict(scores).items()}
