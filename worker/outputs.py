"""How results are encoded: the PNG bytes the service stores (keys: ``masactrl_jobs.storage``).

The encoding is part of the contract: a result downloaded from the service is byte-identical to
``png_bytes`` of the engine's image for the same parameters and seed, which is what the tests
check and what lets a client verify a result by re-running the engine.
"""

from __future__ import annotations

import io

from PIL import Image

__all__ = ["png_bytes"]


def png_bytes(image: Image.Image) -> bytes:
    """The PNG the service stores for ``image`` (Pillow's defaults, no metadata)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
