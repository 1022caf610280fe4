"""Which weight files a load may read: safetensors always, pickles only when the caller allows.

A pickle (``.bin``, ``.ckpt``, ``.pt``, ``.pth``) can run arbitrary code while it loads, so models,
single-file checkpoints and LoRA adapters are read from ``.safetensors`` unless the operator sets
``allow_pickle`` for that source. diffusers and transformers fall back to a folder's pickle when
its safetensors file is missing; :func:`refuse_pickle_only` finds that case in a local folder
before they do, so the refusal names the file, and the loaders are also told
``use_safetensors=True`` (:func:`safetensors_only`) so a hub id cannot fall back either.
"""

from __future__ import annotations

import os
from pathlib import Path

from masactrl_core.errors import ModelLoadError

__all__ = ["PICKLE_SUFFIXES", "SAFE_SUFFIXES", "refuse_pickle_only", "safetensors_only"]

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def is_pickle(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a pickle weight file (by suffix)."""
    return str(path).lower().endswith(PICKLE_SUFFIXES)


def safetensors_only(allow_pickle: bool) -> dict[str, bool]:
    """The loader arguments that forbid a pickle fallback, unless pickles are allowed."""
    return {} if allow_pickle else {"use_safetensors": True}


def refuse_pickle_only(folder: str | os.PathLike[str], what: str) -> None:
    """Raise ``ModelLoadError`` naming the file when a folder (or one of its component folders)
    holds pickle weights but no safetensors weights: loading it would read the pickle."""
    root = Path(folder)
    if not root.is_dir():
        return
    for directory in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        files = [p for p in directory.iterdir() if p.is_file()]
        if any(p.suffix.lower() in SAFE_SUFFIXES for p in files):
            continue
        pickles = sorted(p for p in files if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{what}: {pickles[0].relative_to(root.parent)} is a pickle file, which can run "
                "arbitrary code when loaded, and there is no .safetensors file beside it; convert "
                "it to .safetensors, or set allow_pickle if you trust it"
            )
