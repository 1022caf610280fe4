"""Fixtures shared by the engine and CLI tests (append new ones; do not reorder)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-family checkpoint (seed 0, native 64x64), written once per test session."""
    from masactrl_core.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL-family checkpoint (seed 0, native 64x64, 70 blocks), written once per session."""
    from masactrl_core.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sdxl") / "model", family="sdxl")
