"""How results are stored: PNG encoding and keys (``results/<job_id>/<role>_<k>.png``).

The encoding is part of the contract: a result downloaded from the service is byte-identical to
``png_bytes`` of the engine's image for the same parameters and seed, which is what the tests
check and what lets a client verify a result by re-running the engine.
"""

from __future__ import annotations

import io

from PIL import Image

__all__ = ["png_bytes", "result_key", "results_prefix"]


def png_bytes(image: Image.Image) -> bytes:
    """The PNG the service stores for ``image`` (Pillow's defaults, no metadata)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def results_prefix(job_id: str) -> str:
    """Where a job's images live; a rerun writes the same keys again."""
    return f"results/{job_id}/"


def result_key(job_id: str, role: str, index: int) -> str:
    """``results/<job_id>/source_0.png``, ``results/<job_id>/target_<k>.png``."""
    return f"{results_prefix(job_id)}{role}_{index}.png"
