"""Noise-schedule solvers: the :class:`~masactrl_core.solvers.base.Solver` interface, DDIM and
flow-matching Euler."""

from masactrl_core.solvers.base import InversionStep, Solver, SolverStep
from masactrl_core.solvers.ddim import PREDICTION_TYPES, DDIMSolver
from masactrl_core.solvers.flow import FlowMatchSolver, calculate_shift

__all__ = [
    "PREDICTION_TYPES",
    "DDIMSolver",
    "FlowMatchSolver",
    "InversionStep",
    "Solver",
    "SolverStep",
    "calculate_shift",
]
