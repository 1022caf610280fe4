"""Flow-matching Euler (SD3, FLUX.1) and its exact inverse: rectified-flow inversion.

The model predicts a velocity v and a run moves along σ from 1 (noise) to 0 (image):
x_{i+1} = x_i + (σ_{i+1} − σ_i) · v(x_i, t_i), with t = 1000·σ. The schedule is diffusers'
``FlowMatchEulerDiscreteScheduler`` built from the checkpoint's own scheduler config, set up
exactly as the family's pipeline sets it up:

* **FLUX** (``FluxPipeline``) passes ``sigmas = linspace(1, 1/steps, steps)`` and, when the
  config says ``use_dynamic_shifting``, ``mu = calculate_shift(image_seq_len, base_image_seq_len,
  max_image_seq_len, base_shift, max_shift)`` with the run's number of packed image tokens;
* **SD3** (``StableDiffusion3Pipeline``) passes no sigmas (the scheduler spaces them itself and
  applies its static ``shift``), and ``mu`` likewise only under ``use_dynamic_shifting``.

The step is the scheduler's Euler step written out with the same float32 arithmetic (it is a
single line), so that the step index is the solver's, not the scheduler's hidden counter.

**Inversion** runs the same Euler steps backwards along the same sigmas: for the sampling step
σ_i → σ_{i+1}, the velocity is evaluated at the point the inverse step starts from — the less
noisy x_{i+1}, with its own timestep t_{i+1} (explicit Euler in reverse time, the "Euler
inversion" of the rectified-flow editing literature) — and x_i = x_{i+1} − (σ_{i+1} − σ_i) · v.
Given that velocity the inverse is exact; the round trip differs from the photo only by how much
v changes across one step (zero for a constant field, small with many steps). The first
inversion step starts from the clean latents at σ = 0 (t = 0), which flow models are trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

# From its module: mypy reads diffusers' top-level names as its no-torch placeholders.
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)

from masactrl_core.errors import ModelLoadError
from masactrl_core.solvers.base import InversionStep, Solver, SolverStep

__all__ = ["FlowMatchSolver", "calculate_shift"]


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The dynamic shift μ for ``image_seq_len`` image tokens (diffusers' pipelines' formula)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


class FlowMatchSolver(Solver):
    """Flow-matching Euler from a checkpoint's scheduler config, and Euler inversion.

    ``pipeline_sigmas``: whether the family's pipeline passes FLUX's ``linspace(1, 1/steps)``
    sigmas (True) or lets the scheduler space them (False, SD3).
    """

    prediction_type = "flow"

    def __init__(self, scheduler_config: Mapping[str, Any], *, pipeline_sigmas: bool) -> None:
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        config = self.scheduler.config
        if config.get("stochastic_sampling") or config.get("invert_sigmas"):
            raise ModelLoadError(
                "the scheduler config asks for stochastic sampling or inverted sigmas, which "
                "deterministic inversion cannot retrace"
            )
        self.pipeline_sigmas = pipeline_sigmas
        # The number of image tokens of the run (packed FLUX tokens, SD3 patches): μ depends on it.
        self.image_seq_len: int | None = None
        self._mu: float | None = None

    def set_image_seq_len(self, tokens: int) -> None:
        """Tell the solver how many image tokens the run's latents make (before ``timesteps``)."""
        self.image_seq_len = tokens

    def mu(self) -> float | None:
        """μ of the run, or ``None`` when the config shifts statically."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return None
        if self.image_seq_len is None:
            raise ValueError("a dynamically shifted schedule needs the run's image_seq_len")
        return calculate_shift(
            self.image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    def _set(self, steps: int, device: torch.device) -> None:
        sigmas = None
        if self.pipeline_sigmas and not self.scheduler.config.get("use_flow_sigmas"):
            sigmas = np.linspace(1.0, 1 / steps, steps)
        self._mu = self.mu()
        kwargs: dict[str, Any] = {} if self._mu is None else {"mu": self._mu}
        self.scheduler.set_timesteps(steps, device=device, sigmas=sigmas, **kwargs)

    def timesteps(self, steps: int, device: torch.device) -> torch.Tensor:
        self._set(steps, device)
        timesteps: torch.Tensor = self.scheduler.timesteps
        return timesteps

    def sigmas(self) -> torch.Tensor:
        """The run's σ_0..σ_steps (the last is 0), float32."""
        sigmas: torch.Tensor = self.scheduler.sigmas
        return sigmas

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return sample  # flow matching feeds the latents unscaled

    def _index(self, timestep: torch.Tensor) -> int:
        matches = (self.scheduler.timesteps == timestep.to(self.scheduler.timesteps)).nonzero()
        if not len(matches):
            raise ValueError(f"timestep {float(timestep)} is not one of this run's timesteps")
        return int(matches[0])

    def step(
        self, output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
    ) -> SolverStep:
        index = self._index(timestep)
        sigmas = self.scheduler.sigmas
        sigma, dt = sigmas[index], sigmas[index + 1] - sigmas[index]
        # The scheduler's own arithmetic: float32 sample plus dt times the output in its dtype.
        upcast = sample.to(torch.float32)
        prev = (upcast + dt * output).to(output.dtype)
        original = (upcast - sigma * output.float()).to(output.dtype)
        return SolverStep(prev, original)

    def inversion_steps(self, steps: int, device: torch.device) -> Iterator[InversionStep]:
        """For each sampling step σ_i → σ_{i+1}, least noisy first: (t_{i+1}, σ_i, σ_{i+1})."""
        self._set(steps, device)
        sigmas = self.scheduler.sigmas
        train = self.scheduler.config.num_train_timesteps
        for index in reversed(range(steps)):
            cleaner = sigmas[index + 1]
            # The less noisy point's own timestep, in the scheduler's units (t = σ · T).
            timestep = (cleaner * train).to(self.scheduler.timesteps.dtype)
            yield InversionStep(timestep, float(sigmas[index]), float(cleaner))

    def inverse_step(
        self, output: torch.Tensor, step: InversionStep, sample: torch.Tensor
    ) -> torch.Tensor:
        """x_i = x_{i+1} − (σ_{i+1} − σ_i) · v: the Euler step solved for its start."""
        dt = torch.tensor(step.cleaner, dtype=torch.float32) - torch.tensor(
            step.noisier, dtype=torch.float32
        )
        return sample.float() - dt.to(sample.device) * output.float()

    def describe(self) -> dict[str, Any]:
        config = self.scheduler.config
        schedule: dict[str, Any] = {
            "prediction_type": self.prediction_type,
            "solver": "flow-match euler",
            "sigmas": "linspace(1, 1/steps) then shifted" if self.pipeline_sigmas else "scheduler",
        }
        if config.get("use_dynamic_shifting"):
            schedule["shift"] = {
                "dynamic": True,
                "mu": self._mu,
                "image_seq_len": self.image_seq_len,
            }
        else:
            schedule["shift"] = {"dynamic": False, "shift": config.get("shift", 1.0)}
        schedule["inversion"] = (
            "Euler steps backwards along the sampling sigmas; velocity evaluated at the less "
            "noisy end with its own timestep"
        )
        return schedule
