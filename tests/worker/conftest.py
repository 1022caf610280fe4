"""Fixtures for the worker tests: the tiny checkpoint, its engine, settings and stores."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MASACTRL_* variable or .env file from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.upper().startswith("MASACTRL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path) -> Any:
    """The engine on the tiny checkpoint (CPU, float32), loaded once."""
    from masactrl_core import MasaCtrlEngine

    return MasaCtrlEngine.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread, as the test workers do, so results match bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
