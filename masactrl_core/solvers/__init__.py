"""Noise-schedule solvers: the :class:`~masactrl_core.solvers.base.Solver` interface and DDIM."""

from masactrl_core.solvers.base import InversionStep, Solver, SolverStep
from masactrl_core.solvers.ddim import PREDICTION_TYPES, DDIMSolver

__all__ = ["PREDICTION_TYPES", "DDIMSolver", "InversionStep", "Solver", "SolverStep"]
