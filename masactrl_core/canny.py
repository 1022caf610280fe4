"""Canny edge maps: turn an ordinary photo into the layout a canny ControlNet or adapter expects.

OpenCV (``opencv-python-headless``, in the ``ml`` extra) does the edge detection; it is imported
only when an edge map is made.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from masactrl_core.errors import InvalidInput

DEFAULT_LOW_THRESHOLD = 100
DEFAULT_HIGH_THRESHOLD = 200


def canny(
    image: Image.Image,
    *,
    low_threshold: int = DEFAULT_LOW_THRESHOLD,
    high_threshold: int = DEFAULT_HIGH_THRESHOLD,
) -> Image.Image:
    """White edges on black, as an RGB image of the same size.

    Gradients above ``high_threshold`` are edges; those between the thresholds are edges only when
    connected to one (hysteresis). The photo is converted to grayscale first.
    """
    import cv2

    if not 0 <= low_threshold <= high_threshold:
        raise InvalidInput(
            "canny thresholds must satisfy 0 <= low <= high, "
            f"got low {low_threshold} and high {high_threshold}"
        )
    gray = np.asarray(image.convert("L"))
    edges = cv2.Canny(gray, low_threshold, high_threshold)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


__all__ = ["DEFAULT_HIGH_THRESHOLD", "DEFAULT_LOW_THRESHOLD", "canny"]
