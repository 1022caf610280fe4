"""LoRA adapters on a loaded engine: loaded once each, activated per run, deactivated after.

Loading goes through diffusers' LoRA loader with the peft backend
(``pipeline.load_lora_weights(..., adapter_name=...)``): peft wraps each targeted ``Linear`` of
the UNet (and of the text encoders, when the adapter has weights for them) in a LoRA layer that
adds ``weight * alpha / rank * B(A(x))`` for every active adapter. Activation is
``set_adapters(names, weights)`` plus ``enable_lora()``; deactivation is ``disable_lora()``,
after which every wrapped layer returns its base layer's output unchanged, so a run without
adapters after a run with them equals a freshly loaded engine. The weights stay loaded: switching
adapters between runs costs no reload of the base model or of the adapter.

MasaCtrl's attention processors call ``attn.to_q`` / ``to_k`` / ``to_v`` / ``to_out``, which are
the wrapped layers, so the adapters apply inside mutual self-attention as in any other attention.

Adapter files are ``.safetensors`` files or folders holding one (diffusers' or the Kohya layout,
which diffusers converts); pickle files are refused, a folder holding only one included, unless
the caller allows them (``masactrl_core.weights``). Names are the caller's (catalog names, file
names); peft's own adapter names are derived from them, since peft forbids some characters.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from masactrl_core.errors import InvalidInput, ModelLoadError
from masactrl_core.weights import is_pickle, refuse_pickle_only, safetensors_only

__all__ = ["LoraAdapters", "MAX_ACTIVE_LORAS"]

# More adapters per run multiply the per-layer cost; the service asks for at most this many.
MAX_ACTIVE_LORAS = 4


class LoraAdapters:
    """The adapters loaded into one pipeline, by name, and the set active for the current run."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self._adapters: dict[str, str] = {}  # name -> peft adapter name
        self._sources: dict[str, str] = {}
        self._active: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """The loaded adapters' names, in load order."""
        return list(self._adapters)

    @property
    def active(self) -> dict[str, float]:
        """The adapters active now, with their weights (empty between runs)."""
        return dict(self._active)

    def source(self, name: str) -> str:
        return self._sources[name]

    def load(
        self, name: str, source: str | os.PathLike[str], *, allow_pickle: bool = False
    ) -> None:
        """Load the adapter at ``source`` (a file, a folder or a hub id) as ``name``, once.

        Pickle weights are refused unless ``allow_pickle``: a pickle file, a folder whose only
        weights are one, and a hub id's pickle fallback.
        """
        with self._lock:
            if name in self._adapters:
                return
            path = Path(source)
            if is_pickle(path) and not allow_pickle:
                raise ModelLoadError(
                    f"LoRA {name}: {path.name} is a pickle file, which can run arbitrary code "
                    "when loaded; convert it to .safetensors, or set allow_pickle if you trust it"
                )
            options: dict[str, Any] = safetensors_only(allow_pickle)
            if path.is_file():
                location, options = str(path.parent), {"weight_name": path.name}
            elif path.exists() or str(source).startswith(("/", ".", "~")):
                if not path.is_dir():
                    raise ModelLoadError(f"LoRA {name}: {source} does not exist")
                if not allow_pickle:
                    refuse_pickle_only(path, f"LoRA {name}")
                location = str(path)
            else:
                location = str(source)  # a hub id
            adapter = f"lora{len(self._adapters)}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"
            try:
                self.pipeline.load_lora_weights(location, adapter_name=adapter, **options)
            except Exception as error:
                raise ModelLoadError(f"cannot load LoRA {name} from {source}: {error}") from error
            self._adapters[name] = adapter
            self._sources[name] = str(source)
            # Loading activates the new adapter; nothing is active between runs.
            self.pipeline.disable_lora()

    def activate(self, weights: Mapping[str, float]) -> None:
        """Make exactly ``weights``' adapters active, each scaled by its weight."""
        if len(weights) > MAX_ACTIVE_LORAS:
            raise InvalidInput(
                f"at most {MAX_ACTIVE_LORAS} LoRA adapters per run, got {len(weights)}"
            )
        unknown = [name for name in weights if name not in self._adapters]
        if unknown:
            loaded = ", ".join(self._adapters) or "none"
            raise InvalidInput(f"LoRA {unknown[0]!r} is not loaded; loaded: {loaded}")
        if not weights:
            self.deactivate()
            return
        names = [self._adapters[name] for name in weights]
        self.pipeline.set_adapters(names, adapter_weights=[float(w) for w in weights.values()])
        self.pipeline.enable_lora()
        self._active = {name: float(weight) for name, weight in weights.items()}

    def deactivate(self) -> None:
        """No adapter active: the model computes exactly what it did before any was loaded."""
        if self._adapters:
            self.pipeline.disable_lora()
        self._active = {}

    @contextlib.contextmanager
    def activated(self, weights: Mapping[str, float]) -> Iterator[None]:
        """``weights``' adapters active inside the block, none after it (even on errors)."""
        self.activate(weights)
        try:
            yield
        finally:
            self.deactivate()
