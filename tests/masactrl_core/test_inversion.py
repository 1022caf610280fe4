"""The inversion mathematics, independent of weights: an analytic perfect denoiser.

The denoiser knows a clean latent x0 and a noise e and answers with the exact ε (or v) of the
forward trajectory x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·e at the timestep it is asked about. The paper's
inversion evaluates the model at (x_{t-1}, t) in place of (x_t, t); for this denoiser the two
answers coincide, so the approximation is exact and a round trip isolates the step algebra:
inverting and sampling back must return the latent to float32 rounding, for every prediction type
and timestep spacing. (A denoiser that also reads x would measure the paper's approximation.)
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from masactrl_core import ControlConfig, ModelLoadError
from masactrl_core.engine import InvertedImage, MasaCtrlEngine

STEPS = 10


class PerfectDenoiser(torch.nn.Module):
    """A stand-in UNet returning the exact ε or v of the trajectory of ``clean`` and ``noise``."""

    def __init__(self, unet, alphas_cumprod, clean, noise, prediction_type):
        super().__init__()
        self.inner = unet  # owns the attention processors the engine installs and restores
        self.config = unet.config
        self.alphas = alphas_cumprod
        self.clean, self.noise = clean, noise
        self.prediction_type = prediction_type
        self.timesteps: list[int] = []

    @property
    def device(self):
        return self.inner.device

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def attn_processors(self):
        return self.inner.attn_processors

    def set_attn_processor(self, processors):
        self.inner.set_attn_processor(processors)

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        self.timesteps.append(int(timestep))
        alpha = self.alphas[int(timestep)].double()
        if self.prediction_type == "epsilon":
            output = self.noise
        else:
            output = alpha.sqrt() * self.noise - (1 - alpha).sqrt() * self.clean
        return (output.float().expand(sample.shape[0], *output.shape[1:]),)


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    return StableDiffusionPipeline.from_pretrained(
        tiny_checkpoint, safety_checker=None, requires_safety_checker=False
    )


def perfect_engine(pipeline, prediction_type, spacing, set_alpha_to_one=False):
    pipeline.scheduler = DDIMScheduler.from_config(
        pipeline.scheduler.config,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        set_alpha_to_one=set_alpha_to_one,
    )
    engine = MasaCtrlEngine(pipeline)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn((1, 4, 32, 32), generator=generator, dtype=torch.float64)
    noise = torch.randn((1, 4, 32, 32), generator=generator, dtype=torch.float64)
    engine.unet = PerfectDenoiser(
        pipeline.unet, engine.scheduler.alphas_cumprod, clean, noise, prediction_type
    )
    return engine, clean, noise


def round_trip(engine, latent):
    inverted = engine.invert_latents(latent.float(), steps=STEPS)
    back = engine.edit(
        None,
        [""],
        steps=STEPS,
        guidance_scale=1.0,
        control=ControlConfig(steps=[]),
        inverted=InvertedImage(inverted.latents, STEPS, 64, 64, ""),
    )
    return inverted.latents, back.latents[0:1]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    ("spacing", "set_alpha_to_one"),
    [("leading", False), ("leading", True), ("trailing", False), ("linspace", False)],
)
def test_invert_then_sample_returns_the_latent(
    pipeline, prediction_type, spacing, set_alpha_to_one
):
    engine, clean, noise = perfect_engine(pipeline, prediction_type, spacing, set_alpha_to_one)
    # The clean latent, as the sampler's last state sees it (ᾱ_final is ᾱ_0 or 1).
    final = float(engine.scheduler.final_alpha_cumprod)
    latent = math.sqrt(final) * clean + math.sqrt(1 - final) * noise
    inverted, back = round_trip(engine, latent)
    assert (back - latent).abs().max() < 2e-5
    # The model saw the sampler's timesteps, in reverse, during inversion.
    sampled = [int(t) for t in engine.scheduler.timesteps]
    assert engine.unet.timesteps == sampled[::-1] + sampled
    if spacing == "leading":
        # Each DDIM step ends where the next begins: x_T is the forward-noised latent itself.
        alpha = float(engine.scheduler.alphas_cumprod[sampled[0]])
        expected = math.sqrt(alpha) * clean + math.sqrt(1 - alpha) * noise
        assert (inverted - expected).abs().max() < 2e-5


def test_the_round_trip_would_fail_with_a_wrong_parameterization(pipeline):
    # Guards the test itself: reading v as ε breaks the round trip far beyond the tolerance.
    engine, clean, noise = perfect_engine(pipeline, "v_prediction", "leading")
    engine.prediction_type = "epsilon"
    _, back = round_trip(engine, clean)
    assert (back - clean).abs().max() > 1e-2


def test_unsupported_prediction_type_is_refused(pipeline):
    pipeline.scheduler = DDIMScheduler.from_config(
        pipeline.scheduler.config, prediction_type="sample"
    )
    with pytest.raises(ModelLoadError, match="prediction_type 'sample'"):
        MasaCtrlEngine(pipeline)
