"""The job kinds, one module each, and the registry the gateway and the workers dispatch through.

``KINDS[job_kind]`` is the :class:`~masactrl_jobs.kinds.base.Kind` that submits and runs jobs of
that kind; ``base.py`` says what a kind declares and why a kind is one module here. A new kind is
a new module (a ``Kind`` subclass, with its tests) and one entry below; its route in
``service/api/routes/`` is its HTTP contract.

``import masactrl_jobs`` does not import this package: the kinds pull in the image and video
libraries, which only the gateway and the workers need.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from masactrl_jobs.kinds.base import Kind
from masactrl_jobs.kinds.edit import EDIT
from masactrl_jobs.kinds.sequence import SEQUENCE
from masactrl_jobs.kinds.synthesis import SYNTHESIS
from masactrl_jobs.schema import JobKind

__all__ = ["KINDS", "Kind", "kind_of"]

KINDS: Mapping[JobKind, Kind[Any, Any, Any]] = {
    kind.kind: kind for kind in (EDIT, SYNTHESIS, SEQUENCE)
}


def kind_of(kind: JobKind) -> Kind[Any, Any, Any]:
    """The registered kind of ``kind`` (every ``JobKind`` has one; a test checks it)."""
    return KINDS[kind]
