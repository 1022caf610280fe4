"""DDIM with eta 0 for ε- and v-prediction models, and its exact algebraic inverse.

The scheduler is diffusers' ``DDIMScheduler`` built from the checkpoint's own scheduler config
(so its ``prediction_type``, ``timestep_spacing``, betas and ``set_alpha_to_one`` are the
checkpoint's), with ``clip_sample`` and thresholding forced off: clipping would make inversion
inexact.

Inversion retraces the sampler's own steps: for each sampling step t → t − T/steps (whatever the
spacing) the model is evaluated at (x_{t-1}, t), as in the paper's implementation, and x_t is the
algebraic inverse of the DDIM step for that output: for ε the usual DDIM inversion, for v the
solution of x_{t-1} = a·x_t + b·v. diffusers' ``DDIMInverseScheduler`` converts v at the wrong
noise level and does not round-trip, hence the step written here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

# From its module: mypy reads diffusers' top-level names as its no-torch placeholders.
from diffusers.schedulers.scheduling_ddim import DDIMScheduler

from masactrl_core.errors import ModelLoadError
from masactrl_core.solvers.base import InversionStep, Solver, SolverStep

__all__ = ["PREDICTION_TYPES", "DDIMSolver"]

PREDICTION_TYPES = ("epsilon", "v_prediction")


class DDIMSolver(Solver):
    """DDIM (eta 0) from a checkpoint's scheduler config; refuses other prediction types."""

    def __init__(self, scheduler_config: Mapping[str, Any]) -> None:
        self.scheduler = DDIMScheduler.from_config(
            scheduler_config, clip_sample=False, thresholding=False
        )
        prediction_type: str = self.scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(
                f"prediction_type {prediction_type!r} is not supported; expected one of "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        # Read by the inverse step only: sampling follows the scheduler's own config.
        self.prediction_type = prediction_type

    def timesteps(self, steps: int, device: torch.device) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, device=device)
        timesteps: torch.Tensor = self.scheduler.timesteps
        return timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        scaled: torch.Tensor = self.scheduler.scale_model_input(sample, timestep)
        return scaled

    def step(
        self, output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
    ) -> SolverStep:
        stepped = self.scheduler.step(output, timestep, sample)
        # DDIM's x̂₀ of this step, which it computes anyway on the way to x_{t-1}.
        return SolverStep(stepped.prev_sample, stepped.pred_original_sample)

    def inversion_steps(self, steps: int, device: torch.device) -> Iterator[InversionStep]:
        """(t, ᾱ_t, ᾱ_prev) for each sampling step t → t − T // steps, least noisy first."""
        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=device)
        ratio = scheduler.config.num_train_timesteps // steps
        alphas = scheduler.alphas_cumprod
        for timestep in reversed(scheduler.timesteps):
            previous = int(timestep) - ratio
            alpha_prev = alphas[previous] if previous >= 0 else scheduler.final_alpha_cumprod
            yield InversionStep(timestep, float(alphas[int(timestep)]), float(alpha_prev))

    def inverse_step(
        self, output: torch.Tensor, step: InversionStep, sample: torch.Tensor
    ) -> torch.Tensor:
        """x_t from x_prev: the algebraic inverse of DDIM's step (eta 0) for this model output."""
        alpha, alpha_prev = step.noisier, step.cleaner
        if self.prediction_type == "v_prediction":
            # DDIM's v step is x_prev = a·x_t + b·v; solve it for x_t.
            a = math.sqrt(alpha_prev * alpha) + math.sqrt((1 - alpha_prev) * (1 - alpha))
            b = math.sqrt((1 - alpha_prev) * alpha) - math.sqrt(alpha_prev * (1 - alpha))
            return (sample - b * output) / a
        original = (sample - math.sqrt(1 - alpha_prev) * output) / math.sqrt(alpha_prev)
        return math.sqrt(alpha) * original + math.sqrt(1 - alpha) * output

    def describe(self) -> dict[str, Any]:
        return {
            "prediction_type": self.prediction_type,
            "timestep_spacing": self.scheduler.config.timestep_spacing,
        }
