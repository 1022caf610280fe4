"""The canny preprocessor: edges where the photo has them, thresholds that matter."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from masactrl_core import InvalidInput
from masactrl_core.canny import canny


def square(contrast: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), (100, 100, 100))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(100 + contrast,) * 3)
    return image


def test_edges_outline_the_square_only():
    edges = np.asarray(canny(square(120)))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    on = edges[..., 0] > 0
    assert on[14:50, 14:50].sum() == on.sum() > 100  # all edges lie on the square's border
    assert not on[24:40, 24:40].any()  # and none inside it


def test_thresholds_decide_which_edges_count():
    faint = square(40)
    assert np.asarray(canny(faint, low_threshold=10, high_threshold=50)).any()
    assert not np.asarray(canny(faint, low_threshold=300, high_threshold=600)).any()
    with pytest.raises(InvalidInput, match="low <= high"):
        canny(faint, low_threshold=200, high_threshold=100)
