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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from statistics import mean
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from masactrl_toy.measures import foreground_mask, histogram_distance, pose_compliance
from masactrl_toy.world import Scene, caption, render, scene_pair

if TYPE_CHECKING:
    from masactrl_core import ControlConfig, MasaCtrlEngine

__all__ = ["Scores", "edit_scores", "pair_scores", "synthesis_scores", "total_variation"]


@dataclass(frozen=True)
class Scores:
    consistency: float
    colour: float
    image: float
    compliance: float

    @staticmethod
    def average(scores: Iterable[Scores]) -> Scores:
        items = list(scores)
        return Scores(**{key: mean(getattr(s, key) for s in items) for key in asdict(items[0])})


def pair_scores(source: Image.Image, target: Image.Image, pair: tuple[Scene, Scene]) -> Scores:
    """The scores of one drawn (source, target) against the scene pair they were asked for."""
    source_scene, target_scene = pair
    mask_a = foreground_mask(source, source_scene.background)
    mask_b = foreground_mask(target, target_scene.background)
    return Scores(
        consistency=1.0 - histogram_distance(source, target, mask_a, mask_b),
        colour=_mean_colour_distance(source, target, mask_a, mask_b),
        image=histogram_distance(source, target),
        compliance=pose_compliance(target, asdict(target_scene.pose), target_scene.background),
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


def total_variation(image: Image.Image) -> float:
    """Mean absolute difference of neighbouring pixels, in [0, 1]: noise is high, drawings low."""
    pixels = np.asarray(image.convert("RGB"), np.float64) / 255.0
    return float(
        (np.abs(np.diff(pixels, axis=0)).mean() + np.abs(np.diff(pixels, axis=1)).mean()) / 2
    )


def describe(scores: Scores) -> dict[str, Any]:
    return {key: round(value, 4) for key, value in asdict(scores).items()}
