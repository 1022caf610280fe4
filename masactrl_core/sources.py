"""Where a model reference points, decided once and before anything heavy is imported.

A reference (``--model``, a catalog entry's ``source``, a condition model) is a local folder, a
local checkpoint file or a Hugging Face hub id. The rule, in order:

1. A folder or file that exists is local. A folder must hold ``marker`` (``model_index.json``
   for a pipeline, ``config.json`` for a ControlNet).
2. A reference with a checkpoint suffix (``.safetensors``, ``.ckpt``...) is a file: missing, it
   is an error.
3. A reference that does not exist is a *path*, so an error at once, when it starts with ``/``,
   ``.`` or ``~``, contains ``\\`` or the platform's separator, has more than one ``/``, or its
   first part names a folder that exists (``models/nope`` where ``models/`` is there: a typo in
   a path, far likelier than a hub owner named like a local folder).
4. Anything else (``name`` or ``owner/name``) is a hub id. With ``HF_HUB_OFFLINE`` set (read
   from ``huggingface_hub.constants``, as the library itself does) it must be in the local hub
   cache; nothing is sent. Online, the hub is asked once for ``marker``: no answer within
   ``HF_HUB_ETAG_TIMEOUT`` falls back to the cache, and without a cached copy it is an error.

Why not let diffusers find out: a missing path then goes to the hub as an id, and an unreachable
hub costs five retries with backoff (about 30 s of log lines) before the same answer. Here every
refusal is one :class:`ModelLoadError` sentence within a request's timeout, and torch is never
imported for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from masactrl_core.errors import ModelLoadError
from masactrl_core.single_file import is_single_file

__all__ = ["ModelSource", "locate_local", "locate_model", "looks_like_path"]

PIPELINE_MARKER = "model_index.json"


@dataclass(frozen=True)
class ModelSource:
    """A reference that was found: what it is, and whether to read it from the cache only."""

    reference: str
    kind: Literal["folder", "file", "hub"]
    # A hub id to load with ``local_files_only``: offline, or the hub did not answer.
    cached_only: bool = False


def _first_part_is_a_folder(reference: str) -> bool:
    head = reference.split("/", 1)[0]
    return "/" in reference and bool(head) and Path(head).is_dir()


def _path_by_form(reference: str) -> bool:
    platform_separator = os.sep != "/" and os.sep in reference
    return (
        reference.startswith(("/", ".", "~"))
        or "\\" in reference
        or platform_separator
        or reference.count("/") > 1
    )


def looks_like_path(reference: str) -> bool:
    """Whether a reference that does not exist names a local path rather than a hub id."""
    return _path_by_form(reference) or _first_part_is_a_folder(reference)


def _missing_path(reference: str, what: str) -> ModelLoadError:
    if not _path_by_form(reference):  # owner/name in form; its owner is a local folder
        head = reference.split("/", 1)[0]
        return ModelLoadError(
            f"{what} {reference}: no such folder or file (read as a path because ./{head} "
            "exists; a hub id would be owner/name)"
        )
    return ModelLoadError(f"{what} {reference}: no such folder or file")


def locate_model(reference: str, what: str = "model", marker: str = PIPELINE_MARKER) -> ModelSource:
    """Find ``reference`` by the rule above, or raise :class:`ModelLoadError` in one sentence.

    ``what`` names the reference in that sentence (``--model``, ``condition model``...).
    """
    local = locate_local(reference, what, marker)
    return local if local is not None else _hub_source(reference, what, marker)


def locate_local(
    reference: str, what: str = "model", marker: str = PIPELINE_MARKER
) -> ModelSource | None:
    """Rules 1 to 3 only: the local folder or file, ``None`` for a hub id; nothing is sent."""
    path = Path(reference).expanduser()
    if is_single_file(reference):
        if not path.is_file():
            raise ModelLoadError(f"{what} {reference}: no such file")
        return ModelSource(reference, "file")
    if path.is_dir():
        if not (path / marker).is_file():
            raise ModelLoadError(f"{what} {reference} is a folder without {marker}")
        return ModelSource(reference, "folder")
    if path.exists():
        raise ModelLoadError(
            f"{what} {reference} is a file without a checkpoint suffix (.safetensors)"
        )
    if looks_like_path(reference):
        raise _missing_path(reference, what)
    return None


def _hub_source(repo_id: str, what: str, marker: str) -> ModelSource:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, marker), str)
    if constants.is_offline_mode():
        if not cached:
            raise ModelLoadError(
                f"{what} {repo_id} is not in the local hub cache and HF_HUB_OFFLINE is set: "
                "download it once while online, or give a local folder"
            )
        return ModelSource(repo_id, "hub", cached_only=True)
    answer = _ask_hub(repo_id, marker)
    if answer == "found":
        return ModelSource(repo_id, "hub")
    if answer == "unreachable":
        if cached:
            return ModelSource(repo_id, "hub", cached_only=True)
        raise ModelLoadError(
            f"{what} {repo_id}: the hub ({constants.ENDPOINT}) cannot be reached and the model "
            "is not in the local hub cache; give a local folder, or try again when online"
        )
    raise ModelLoadError(
        f"{what} {repo_id}: the hub has no such model that this machine may read ({answer}); "
        "check the id, or set HF_TOKEN for a private or gated model"
    )


@lru_cache(maxsize=32)
def _ask_hub(repo_id: str, marker: str) -> str:
    """``found``, ``unreachable`` or the HTTP status the hub gave: one request, no retries
    (cached: the CLI asks before it loads, the engine again as it loads)."""
    from huggingface_hub import constants, get_session, get_token, hf_hub_url

    # Only the token: the library's full headers would first fetch its agent registry from the
    # hub, a second request that an unreachable hub would make wait.
    token = get_token()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = get_session().head(
            hf_hub_url(repo_id, marker), headers=headers, timeout=constants.HF_HUB_ETAG_TIMEOUT
        )
    except Exception:  # noqa: BLE001 - any transport failure (DNS, refused, timeout) is "no answer"
        return "unreachable"
    if response.status_code < 400:
        return "found"
    if response.status_code >= 500:
        return "unreachable"
    return f"HTTP {response.status_code}"
