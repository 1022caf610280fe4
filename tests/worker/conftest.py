"""Fixtures for the worker tests: the tiny checkpoint, its engine, settings and stores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


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


# Both take the test module's own `settings` fixture (each runner test module configures its
# worker: catalog, lease, retries).
@pytest.fixture()
def store(settings: Any) -> Iterator[Any]:
    """The job store on the module's Redis, closed after the test."""
    from masactrl_jobs.store import JobStore

    store = JobStore.from_url(settings.redis_url)
    yield store
    store.close()


@pytest.fixture()
def storage(settings: Any, tmp_path: Path) -> Any:
    """File storage under the test's folder, signing with the module's key."""
    from masactrl_jobs.storage import FileStorage

    return FileStorage(tmp_path / "storage", signing_key=settings.signing_key)
