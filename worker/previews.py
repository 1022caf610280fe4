"""Publishing a running job's live previews: small WebP images in storage, an event in the store.

The engine decodes a preview on its own thread (``masactrl_core.previews.Previews`` decides
when); what follows must not hold the GPU up, so :class:`PreviewPublisher` does it on one
background thread: encode each image as WebP, store it under
``results/<job_id>/previews/<step>/<role>_<index>.webp``, record the set with the store's
``preview`` operation (the job's ``preview`` field and a ``preview`` event, only while it runs),
then delete the set before the previous one. Two sets are kept so that a client that just got the
previous event can still load its images; each step has its own keys, so a browser never shows a
cached older image under a new URL.

A preview still being published when the next is due is dropped, not queued: only the latest
matters. Previews are informational, so a failure is logged and never fails the job; the runner
calls :meth:`PreviewPublisher.close` before it writes results or ends the job, so no preview
lands after that.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import Future, ThreadPoolExecutor

from PIL import Image

from masactrl_jobs.schema import ImageRole
from masactrl_jobs.storage import Storage, preview_key, previews_prefix
from masactrl_jobs.store import JobStore, PreviewImageRecord, PreviewRecord

__all__ = ["PREVIEW_CLOSE_TIMEOUT_SECONDS", "PreviewPublisher", "webp_bytes"]

logger = logging.getLogger(__name__)

# How long the end of a job waits for a preview still being stored.
PREVIEW_CLOSE_TIMEOUT_SECONDS = 30.0
_WEBP_QUALITY = 80


def webp_bytes(image: Image.Image) -> bytes:
    """A preview image as WebP (a few kilobytes at 256 px)."""
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", quality=_WEBP_QUALITY)
    return buffer.getvalue()


class PreviewPublisher:
    """The sink of one run's previews (a ``masactrl_core.previews.PreviewSink``).

    ``target_role`` names the images after the first (the source): ``target`` for edits and
    syntheses, ``frame`` for sequences.
    """

    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        job_id: str,
        *,
        target_role: ImageRole = ImageRole.target,
    ) -> None:
        self.store = store
        self.storage = storage
        self.job_id = job_id
        self.target_role = target_role
        self.published: list[int] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"previews-{job_id[-8:]}")
        self._pending: Future[None] | None = None

    def __call__(self, step: int, total: int, images: list[Image.Image]) -> None:
        if self._pending is not None and not self._pending.done():
            logger.debug(
                "job %s: preview of step %d dropped (one is being stored)", self.job_id, step
            )
            return
        self._pending = self._executor.submit(self._publish, step, total, images)

    def _roles(self, count: int) -> list[tuple[ImageRole, int]]:
        return [(ImageRole.source, 0)] + [(self.target_role, k) for k in range(count - 1)]

    def _publish(self, step: int, total: int, images: list[Image.Image]) -> None:
        try:
            records = []
            for (role, index), image in zip(self._roles(len(images)), images, strict=True):
                key = preview_key(self.job_id, step, role.value, index)
                self.storage.put(key, webp_bytes(image), "image/webp")
                records.append(PreviewImageRecord(role, index, key))
            result = self.store.preview(self.job_id, PreviewRecord(step, total, records))
            self.published.append(step)
            if not result.updated:
                return  # the job ended meanwhile; the runner removes what is stored
            while len(self.published) > 2:
                old = self.published.pop(0)
                self.storage.delete_prefix(f"{previews_prefix(self.job_id)}{old}/")
        except Exception as exc:
            logger.warning("job %s: preview of step %d failed: %s", self.job_id, step, exc)

    def close(self) -> None:
        """Wait for a preview still being stored, then stop the thread."""
        pending = self._pending
        if pending is not None:
            try:
                pending.result(timeout=PREVIEW_CLOSE_TIMEOUT_SECONDS)
            except Exception as exc:  # a timeout: the preview is abandoned, the job goes on
                logger.warning("job %s: a preview did not finish storing: %s", self.job_id, exc)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def remove(self) -> None:
        """Delete every stored preview of the job (after it succeeded: its results replace them)."""
        try:
            self.storage.delete_prefix(previews_prefix(self.job_id))
        except Exception as exc:
            logger.warning("job %s: could not delete its previews: %s", self.job_id, exc)
