"""The flow-matching Euler solver: the pipelines' schedules, the step, and its exact inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
)

from masactrl_core.errors import ModelLoadError
from masactrl_core.solvers.flow import FlowMatchSolver, calculate_shift
from masactrl_core.tiny_mmdit import FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG

CPU = torch.device("cpu")


@pytest.mark.parametrize("tokens", [64, 256, 1024, 4096])
def test_mu_is_the_pipelines_formula(tokens):
    assert calculate_shift(tokens) == pytest.approx(flux_shift(tokens), abs=1e-12)
    assert calculate_shift(tokens, 128, 2048, 0.3, 1.0) == pytest.approx(
        flux_shift(tokens, 128, 2048, 0.3, 1.0), abs=1e-12
    )


@pytest.mark.parametrize("tokens", [256, 1024])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flux_schedule_equals_flux_pipeline(tokens, steps):
    """FluxPipeline: linspace sigmas, dynamic shift with mu from the image tokens."""
    solver = FlowMatchSolver(FLUX_SCHEDULER_CONFIG, pipeline_sigmas=True)
    solver.set_image_seq_len(tokens)
    ours = solver.timesteps(steps, CPU).clone()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG)
    expected, _ = retrieve_timesteps(
        scheduler,
        steps,
        CPU,
        sigmas=np.linspace(1.0, 1 / steps, steps),
        mu=flux_shift(tokens, 256, 4096, 0.5, 1.15),
    )
    assert torch.equal(ours, expected)
    assert torch.equal(solver.sigmas(), scheduler.sigmas)
    # Another resolution, another schedule.
    solver.set_image_seq_len(tokens * 4)
    if steps > 1:
        assert not torch.equal(solver.timesteps(steps, CPU), expected)


def test_sd3_schedule_equals_scheduler_with_static_shift():
    solver = FlowMatchSolver(SD3_SCHEDULER_CONFIG, pipeline_sigmas=False)
    ours = solver.timesteps(10, CPU).clone()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10, device=CPU)
    assert torch.equal(ours, scheduler.timesteps)
    assert solver.describe()["shift"] == {"dynamic": False, "shift": 3.0}


def test_step_equals_the_schedulers_euler_step():
    solver = FlowMatchSolver(FLUX_SCHEDULER_CONFIG, pipeline_sigmas=True)
    solver.set_image_seq_len(256)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG)
    timesteps = solver.timesteps(5, CPU)
    retrieve_timesteps(scheduler, 5, CPU, sigmas=np.linspace(1.0, 1 / 5, 5), mu=flux_shift(256))
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 16, 8, 8, generator=generator)
    ours = theirs = sample
    for t in timesteps:
        velocity = torch.randn(2, 16, 8, 8, generator=generator)
        stepped = solver.step(velocity, t, ours)
        # x̂₀ is the clean latents the velocity points at: x − σ v.
        index = int((timesteps == t).nonzero()[0])
        assert torch.allclose(
            stepped.pred_original_sample, ours - solver.sigmas()[index] * velocity, atol=1e-6
        )
        ours = stepped.prev_sample
        theirs = scheduler.step(velocity, t, theirs).prev_sample
        assert torch.equal(ours, theirs)


def _round_trip(solver: FlowMatchSolver, field, steps: int, clean: torch.Tensor) -> torch.Tensor:
    """Invert ``clean`` with the velocity ``field(x, t)``, then sample back; the result."""
    sample = clean
    for step in solver.inversion_steps(steps, CPU):
        sample = solver.inverse_step(field(sample, step.timestep), step, sample)
    for t in solver.timesteps(steps, CPU):
        sample = solver.step(field(sample, t), t, sample).prev_sample
    return sample


def test_inversion_round_trip_is_exact_for_a_fixed_velocity_field():
    solver = FlowMatchSolver(FLUX_SCHEDULER_CONFIG, pipeline_sigmas=True)
    solver.set_image_seq_len(256)
    generator = torch.Generator().manual_seed(1)
    clean = torch.randn(1, 16, 8, 8, generator=generator)
    velocity = torch.randn(1, 16, 8, 8, generator=generator)
    back = _round_trip(solver, lambda x, t: velocity, 10, clean)
    assert (back - clean).abs().max().item() < 1e-5
    # The inverted end is where the straight path through the clean latents goes at σ = 1.
    inverted = clean
    for step in solver.inversion_steps(10, CPU):
        inverted = solver.inverse_step(velocity, step, inverted)
    assert torch.allclose(inverted, clean + velocity, atol=1e-5)


def test_inversion_evaluates_the_less_noisy_end_at_its_own_timestep():
    solver = FlowMatchSolver(FLUX_SCHEDULER_CONFIG, pipeline_sigmas=True)
    solver.set_image_seq_len(256)
    steps = list(solver.inversion_steps(4, CPU))
    sigmas = solver.sigmas()
    assert [s.cleaner for s in steps] == pytest.approx(sigmas[1:].flip(0).tolist())
    assert [s.noisier for s in steps] == pytest.approx(sigmas[:-1].flip(0).tolist())
    assert [float(s.timestep) for s in steps] == pytest.approx(
        [1000 * s.cleaner for s in steps], rel=1e-6
    )
    assert float(steps[0].timestep) == 0.0  # from the clean latents


def test_a_state_dependent_field_round_trips_with_an_error_that_shrinks_with_steps():
    """Euler inversion is exact in the velocity it evaluates; a field that varies along the path
    leaves an error of one step's variation, which more steps shrink."""
    solver = FlowMatchSolver(FLUX_SCHEDULER_CONFIG, pipeline_sigmas=True)
    solver.set_image_seq_len(256)
    clean = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))

    def field(x, t):
        return 0.5 * x + 0.001 * float(t)

    errors = [(_round_trip(solver, field, n, clean) - clean).abs().mean().item() for n in (4, 32)]
    assert errors[1] < errors[0] / 4


def test_stochastic_sampling_is_refused():
    with pytest.raises(ModelLoadError, match="stochastic"):
        FlowMatchSolver(
            {**FLUX_SCHEDULER_CONFIG, "stochastic_sampling": True}, pipeline_sigmas=True
        )
