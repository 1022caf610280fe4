"""MasaCtrl engine: tuning-free mutual self-attention control for Stable Diffusion."""

from typing import Any

from masactrl_core.errors import InvalidInput, JobCancelled, ModelLoadError

__all__ = [
    "Condition",
    "ConditionModel",
    "ControlConfig",
    "EngineOptions",
    "InvalidInput",
    "InvertedImage",
    "JobCancelled",
    "MaskConfig",
    "MasaCtrlEngine",
    "MasaCtrlResult",
    "ModelLoadError",
    "RunStats",
    "SequenceResult",
]


def __getattr__(name: str) -> Any:
    # torch loads only when the engine is used, so `masactrl --help` and error paths stay fast.
    if name in __all__:
        from masactrl_core import engine

        return getattr(engine, name)
    raise AttributeError(name)
