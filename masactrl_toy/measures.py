"""Analytic scores for toy-world images: identity consistency and pose compliance.

No learned classifier: the world's palette is known, so the creature is found as the pixels far
from the scene's two background colours, its beak by its fixed orange, and the pose read from
where those pixels lie. These work on generated images as well as renders (a generated image has
no mask of its own), which is what an ablation needs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image

from masactrl_toy.world import _BEAK, BACKGROUNDS

__all__ = [
    "colour_histogram",
    "foreground_mask",
    "histogram_distance",
    "pose_compliance",
    "read_pose",
]

_BINS = 4  # per channel: 64 colour bins, coarse enough to ignore antialiasing
_BACKGROUND_TOLERANCE = 60.0  # RGB distance beyond which a pixel is not background
_BEAK_TOLERANCE = 60.0
# Sitting lowers the body: over 300 renders at 32 px the creature's vertical centroid lies in
# 0.38-0.45 of the height when standing and 0.48-0.58 when sitting.
_SITTING_CENTROID = 0.465
# Arms reach ~0.2 of the width from the body's centre (the body only 0.13); raised, their top is
# 0.05-0.12 below the top of the head or hat, hanging 0.22-0.29 (see world._draw_creature).
_ARM_REACH = 0.15
_ARMS_UP_DROP = 0.17


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def colour_histogram(image: Image.Image, mask: np.ndarray | None = None) -> np.ndarray:
    """Normalised 64-bin RGB histogram of the image, or of its pixels under `mask`."""
    pixels = _pixels(image).reshape(-1, 3)
    if mask is not None:
        pixels = pixels[mask.reshape(-1)]
    if len(pixels) == 0:
        return np.zeros(_BINS**3)
    idx = np.clip((pixels * _BINS / 256).astype(int), 0, _BINS - 1)
    flat = idx[:, 0] * _BINS * _BINS + idx[:, 1] * _BINS + idx[:, 2]
    counts = np.bincount(flat, minlength=_BINS**3).astype(np.float64)
    return counts / counts.sum()


def histogram_distance(
    a: Image.Image,
    b: Image.Image,
    mask_a: np.ndarray | None = None,
    mask_b: np.ndarray | None = None,
) -> float:
    """Total-variation distance of two colour histograms: 0 same colours, 1 disjoint."""
    return float(0.5 * np.abs(colour_histogram(a, mask_a) - colour_histogram(b, mask_b)).sum())


def foreground_mask(image: Image.Image, background: str) -> np.ndarray:
    """Pixels far from both of the background's colours: the creature, in renders or samples."""
    pixels = _pixels(image)
    far = np.ones(pixels.shape[:2], dtype=bool)
    for colour in BACKGROUNDS[background]:
        far &= np.linalg.norm(pixels - np.asarray(colour, np.float32), axis=-1) > (
            _BACKGROUND_TOLERANCE
        )
    return far


def read_pose(image: Image.Image, background: str) -> dict[str, str | None]:
    """Position, facing and stance read from the image; None where the image shows no creature."""
    mask = foreground_mask(image, background)
    size = mask.shape[0]
    if mask.sum() < max(4, size * size // 200):
        return {"position": None, "facing": None, "stance": None, "arms": None}
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / size, ys.mean() / size
    beak = np.linalg.norm(_pixels(image) - np.asarray(_BEAK, np.float32), axis=-1)
    beak_xs = np.nonzero(beak < _BEAK_TOLERANCE)[1]
    facing = None
    if len(beak_xs):
        facing = "left" if beak_xs.mean() / size < cx else "right"
    stance = "sitting" if cy > _SITTING_CENTROID else "standing"
    return {
        "position": "left" if cx < 0.5 else "right",
        "facing": facing,
        "stance": stance,
        "arms": _arms(mask, cx, facing),
    }


def _arms(mask: np.ndarray, cx: float, facing: str | None) -> str | None:
    """Arms up or down from the back arm: the only part reaching that far out behind the body.

    The beak (and a sitting creature's feet) stick out on the facing side, so only the other side
    is read; there, the highest far-out pixel is the arm's top: near the head's height when the
    arms are up, at the shoulder when they hang down.
    """
    if facing is None:
        return None
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    offset = (xs + 0.5) / size - cx
    behind = offset < -_ARM_REACH if facing == "right" else offset > _ARM_REACH
    if not behind.any():
        return None
    drop = (ys[behind].min() - ys.min()) / size  # below the top of the head (or hat)
    return "up" if drop < _ARMS_UP_DROP else "down"


def pose_compliance(image: Image.Image, pose: Mapping[str, str], background: str) -> float:
    """Fraction of the prompted pose attributes (of those `read_pose` reads) the image shows."""
    seen = read_pose(image, background)
    return sum(seen[k] == pose[k] for k in seen) / len(seen)
