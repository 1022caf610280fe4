"""A cache of inverted latents (x_T) of real images, in object storage as safetensors.

DDIM inversion costs as many UNet evaluations as denoising, and it depends only on the image, the
model, the size, the step count, the inversion prompt and the active LoRA adapters. A user
trying new target prompts on the same photo therefore pays for it once. Objects live at
``cache/inversions/<model>/<sha256 of the key fields>.safetensors``; an index in the job store
remembers when each was last used, and :meth:`InversionCache.sweep` deletes what has not been
used within the retention or exceeds the entry limit (least recently used first).

The cache is an optimization: any failure to read or write it is logged and the job goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence

from masactrl_jobs.storage import ObjectNotFound, Storage
from masactrl_jobs.store import JobStore

__all__ = ["InversionCache", "inversion_cache_key"]

logger = logging.getLogger(__name__)

CACHE_PREFIX = "cache/inversions"


def inversion_cache_key(
    image_sha256: str,
    model: str,
    width: int,
    height: int,
    steps: int,
    prompt: str,
    loras: Sequence[tuple[str, str, float]] = (),
) -> str:
    """The storage key of an inversion; any change in the inputs gives another key.

    ``loras`` are the active adapters as (name, source, weight): they change the UNet and the
    text encoder, so an inversion under one set is not valid under another. Their order does
    not matter (adapters add up); without adapters the key is what it was before adapters existed.
    """
    fields: list[object] = [image_sha256, model, int(width), int(height), int(steps), prompt]
    if loras:
        fields.append(sorted([name, source, float(weight)] for name, source, weight in loras))
    digest = hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()
    return f"{CACHE_PREFIX}/{model}/{digest}.safetensors"


class InversionCache:
    """Load, store and expire cached inversions."""

    def __init__(
        self,
        storage: Storage,
        store: JobStore,
        *,
        retention_seconds: float,
        max_entries: int,
    ) -> None:
        self.storage = storage
        self.store = store
        self.retention_seconds = retention_seconds
        self.max_entries = max_entries

    def load(self, key: str) -> bytes | None:
        """The cached bytes, or None on a miss (or any error: the job then inverts itself)."""
        try:
            data = self.storage.get(key)
        except ObjectNotFound:
            return None
        except Exception as exc:
            logger.warning("inversion cache read of %s failed: %s", key, exc)
            return None
        self._touch(key)
        return data

    def save(self, key: str, data: bytes) -> None:
        """Store an inversion (best effort)."""
        try:
            self.storage.put(key, data, "application/octet-stream")
        except Exception as exc:
            logger.warning("inversion cache write of %s failed: %s", key, exc)
            return
        self._touch(key)

    def _touch(self, key: str) -> None:
        try:
            self.store.touch_inversion(key)
        except Exception as exc:
            logger.warning("inversion cache index update failed: %s", exc)

    def sweep(self, now: float | None = None, limit: int = 500) -> int:
        """Delete entries unused within the retention and beyond ``max_entries``; how many."""
        now = time.time() if now is None else now
        expired = self.store.stale_inversions(
            now - self.retention_seconds, self.max_entries, limit=limit
        )
        removed = 0
        for key in expired:
            try:
                self.storage.delete(key)
            except Exception as exc:
                logger.warning("could not delete cached inversion %s: %s", key, exc)
                continue
            self.store.forget_inversion(key)
            removed += 1
        if removed:
            logger.info("inversion cache: removed %d entries", removed)
        return removed
