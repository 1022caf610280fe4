"""The noise-schedule solver interface: how a run moves between noise levels, both ways.

The sampler (:mod:`masactrl_core.sampler`) owns *what* is denoised (rows, guidance, control);
a solver owns *how* one model output moves the latents: which timesteps a run of ``steps``
visits, how the model input is scaled, one sampling step (to the next, less noisy state, with
the predicted clean latents for previews), and its exact inverse for real-image inversion.

Two schedules are in view. DDIM (:mod:`masactrl_core.solvers.ddim`, eta 0) predicts ε or v and
moves along ᾱ_t; a flow-matching Euler solver (SD3, FLUX: velocity prediction, sigmas with a
shift) moves along σ. Both fit: an :class:`InversionStep` carries the timestep the model sees and
the solver's own noise coordinate at both ends of the step (ᾱ for DDIM, σ for flow matching),
and only the solver interprets them. Inversion evaluates the model at the *less noisy* end with
the timestep of the noisier one (the paper's approximation), then solves the sampling step for
its start: for DDIM and for Euler steps that solution is exact in the model output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["InversionStep", "Solver", "SolverStep"]


@dataclass(frozen=True)
class SolverStep:
    """One sampling step's result: the next latents and the clean latents it predicts (x̂₀)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


@dataclass(frozen=True)
class InversionStep:
    """One sampling step seen from inversion (least noisy first).

    ``timestep`` is what the model is evaluated at; ``noisier`` and ``cleaner`` are the solver's
    noise coordinate at the step's two ends, in its own units.
    """

    timestep: torch.Tensor
    noisier: float
    cleaner: float


class Solver(ABC):
    """A noise schedule with its sampling step and the exact inverse of that step."""

    #: What the denoiser predicts (DDIM: ``epsilon`` or ``v_prediction``; flow: ``flow``).
    prediction_type: str
    #: The diffusers scheduler the solver steps with (callers read its ``config``).
    scheduler: Any

    def set_image_seq_len(self, tokens: int) -> None:
        """Tell the solver the run's number of image tokens (before :meth:`timesteps`).

        Flow-matching schedules with a dynamic shift depend on it; others ignore it.
        """
        return

    @abstractmethod
    def timesteps(self, steps: int, device: torch.device) -> torch.Tensor:
        """Set up a run of ``steps`` sampling steps; the timesteps, noisiest first."""

    @abstractmethod
    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The denoiser's input for ``sample`` at ``timestep``."""

    @abstractmethod
    def step(
        self, output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
    ) -> SolverStep:
        """One sampling step from ``sample`` at ``timestep`` given the (guided) model output."""

    @abstractmethod
    def inversion_steps(self, steps: int, device: torch.device) -> Iterator[InversionStep]:
        """The sampling steps of a run of ``steps``, in inversion order (least noisy first).

        They must retrace exactly the steps :meth:`timesteps` and :meth:`step` take, so that
        inverting and sampling back returns the latents.
        """

    @abstractmethod
    def inverse_step(
        self, output: torch.Tensor, step: InversionStep, sample: torch.Tensor
    ) -> torch.Tensor:
        """The noisier latents whose sampling step with ``output`` gives ``sample``."""

    def describe(self) -> dict[str, Any]:
        """What a run record should say about the schedule."""
        return {"prediction_type": self.prediction_type}
