"""Live previews: the predicted clean image x̂₀ of a denoising run, decoded small every few steps.

DDIM predicts x̂₀ on its way from x_t to x_{t-1} at every step (the scheduler's
``pred_original_sample``); the engine hands it, for every image of the batch ([source, targets]
or [source, frames]), to a :data:`LatentsCallback`. :class:`Previews` is such a callback: it
decides when a preview is due (every ``every`` steps, never more often than ``min_interval``
seconds, never at the last step, whose images are decoded in full right after) and decodes the
latents with a :class:`PreviewDecoder`, a tiny autoencoder (diffusers' ``AutoencoderTiny``, the
TAESD family) when one is loaded, else the model's own VAE.

Decoding runs on the engine's thread, inside its inference mode; what happens to the images
(encoding, storage) is the sink's business and should not hold the GPU up.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from masactrl_core.errors import ModelLoadError

__all__ = [
    "DEFAULT_MAX_SIDE",
    "LatentsCallback",
    "PreviewDecoder",
    "PreviewSink",
    "Previews",
    "load_preview_decoder",
]

# Called with (step, total, x̂₀) after denoising step ``step`` (1-based) of ``total``; x̂₀ has one
# row per image of the run, in the model's latent space (VAE posterior × scaling factor).
LatentsCallback = Callable[[int, int, torch.Tensor], None]
# Receives (step, total, images): one small image per row of x̂₀, in the same order.
PreviewSink = Callable[[int, int, list[Image.Image]], None]

DEFAULT_MAX_SIDE = 256


class PreviewDecoder:
    """Latents to small RGB images, with a tiny autoencoder or the model's VAE.

    ``tiny`` says which it is (callers decode the full VAE less often: it costs as much as the
    final decode of the images).
    """

    def __init__(self, vae: Any, *, tiny: bool, max_side: int = DEFAULT_MAX_SIDE) -> None:
        if max_side < 8:
            raise ValueError("max_side must be at least 8 pixels")
        self.vae = vae
        self.tiny = tiny
        self.max_side = max_side

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """One image per row of ``latents``, at most ``max_side`` pixels on the long side."""
        images = []
        scaling = float(self.vae.config.scaling_factor)
        # FLUX's and SD3's VAEs also shift their latents (the pipelines add it back); others: 0.
        shift = float(self.vae.config.get("shift_factor") or 0.0)
        # One row at a time, like the engine's final decode: memory does not grow with targets.
        for row in latents.split(1):  # type: ignore[no-untyped-call]
            scaled = row.to(self.vae.dtype) / scaling + shift
            decoded = self.vae.decode(scaled, return_dict=False)[0]
            # Both decoders give [-1, 1] (AutoencoderTiny rescales its [0, 1] output to match).
            pixels = ((decoded[0].float() + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
            image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
            if max(image.size) > self.max_side:
                image.thumbnail((self.max_side, self.max_side), Image.Resampling.BILINEAR)
            images.append(image)
        return images


def load_preview_decoder(
    engine: Any,
    source: str | os.PathLike[str] | None,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
) -> PreviewDecoder:
    """The preview decoder of ``engine``: the ``AutoencoderTiny`` at ``source``, else its VAE.

    The tiny autoencoder goes on the engine's device and dtype and must decode the engine's
    latents (same latent channels); loading is slow, so callers keep the result.
    """
    if source is None:
        return PreviewDecoder(engine.vae, tiny=False, max_side=max_side)
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny

    name = str(source)
    try:
        tiny = AutoencoderTiny.from_pretrained(name, dtype=engine.dtype)
    except Exception as error:  # hub or file errors: one sentence for the caller
        raise ModelLoadError(f"cannot load preview autoencoder {name}: {error}") from error
    channels = int(tiny.config.latent_channels)
    # The latents the sampler holds (FLUX's transformer takes them packed, 4x the channels).
    expected = int(engine.backbone.latent_channels)
    if channels != expected:
        raise ModelLoadError(
            f"preview autoencoder {name} decodes {channels}-channel latents, but the model's "
            f"have {expected}"
        )
    tiny.to(engine.device)
    tiny.eval()
    return PreviewDecoder(tiny, tiny=True, max_side=max_side)


class Previews:
    """A :data:`LatentsCallback` that decodes x̂₀ when a preview is due and passes it to ``sink``.

    Due at step ``s`` of ``total`` when ``s < total``, at least ``every`` steps after the last
    preview and at least ``min_interval`` seconds after it: on a fast GPU the time limit thins
    previews out; on a slow one the step count does.
    """

    def __init__(
        self,
        decoder: PreviewDecoder,
        sink: PreviewSink,
        *,
        every: int = 5,
        min_interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every < 1:
            raise ValueError("every must be at least 1 step")
        if min_interval < 0:
            raise ValueError("min_interval must not be negative")
        self.decoder = decoder
        self.sink = sink
        self.every = every
        self.min_interval = min_interval
        self._clock = clock
        self._last_step = 0
        self._last_time = float("-inf")

    def due(self, step: int, total: int) -> bool:
        """Whether a preview is due after ``step`` (and, if so, that it is taken now)."""
        if step >= total or step - self._last_step < self.every:
            return False
        now = self._clock()
        if now - self._last_time < self.min_interval:
            return False
        self._last_step, self._last_time = step, now
        return True

    def __call__(self, step: int, total: int, latents: torch.Tensor) -> None:
        if step < self._last_step:
            # A new phase or run restarted the count (the callback is reused): start over.
            self._last_step = 0
        if self.due(step, total):
            self.sink(step, total, self.decoder.decode(latents))
