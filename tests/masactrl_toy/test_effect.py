"""The effect scores on renders, where the truth is known: same creature, other creature, noise."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from PIL import Image

from masactrl_toy.effect import (
    POSE_ATTRIBUTES,
    Scores,
    flip,
    pair_scores,
    pixel_distance,
    total_variation,
)
from masactrl_toy.world import random_scene, render, scene_pair


def test_scores_tell_the_same_creature_from_another() -> None:
    same, other = [], []
    for seed in range(12):
        pair = scene_pair(seed)
        source, target = render(pair[0], 32)[0], render(pair[1], 32)[0]
        stranger = render(random_scene(seed + 500), 32)[0]
        same.append(pair_scores(source, target, pair))
        other.append(pair_scores(source, stranger, pair))
    same_mean, other_mean = Scores.average(same), Scores.average(other)
    assert same_mean.consistency > other_mean.consistency + 0.2
    assert same_mean.colour < other_mean.colour
    # Renders of the target pose show it: compliance near 1 (the analytic readers' errors aside).
    assert same_mean.compliance > 0.9


def test_total_variation_separates_drawings_from_noise() -> None:
    drawing = render(random_scene(0), 32)[0]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    assert total_variation(drawing) < 0.1 < total_variation(noise)


def test_flip_changes_one_attribute_and_the_truth_differs_from_the_source() -> None:
    scene = random_scene(3)
    for attribute in POSE_ATTRIBUTES:
        flipped = flip(scene, attribute)
        before, after = asdict(scene.pose), asdict(flipped.pose)
        assert {k for k in before if before[k] != after[k]} == {attribute}
        assert flipped.identity == scene.identity and flipped.background == scene.background
        assert flip(flipped, attribute) == scene
        source, truth = render(scene, 32)[0], render(flipped, 32)[0]
        assert pixel_distance(source, source) == 0.0
        assert 0.0 < pixel_distance(source, truth) < 1.0
