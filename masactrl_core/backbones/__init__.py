"""Model families as backbones, and the registry that picks one for a checkpoint.

``BACKBONES`` maps a family name to its :class:`~masactrl_core.backbones.base.Backbone` class.
:func:`detect_family` asks each family, most specific first, whether it recognizes a
checkpoint's ``model_index.json``; ``sd`` recognizes anything SD-shaped and comes last. A new
family is one module with a ``Backbone`` subclass (and a solver if its schedule is not DDIM) plus
one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from masactrl_core.backbones.base import Backbone, Conditioning, ConditionResiduals
from masactrl_core.backbones.flux import FluxBackbone
from masactrl_core.backbones.sd import SDBackbone
from masactrl_core.backbones.sd3 import SD3Backbone
from masactrl_core.backbones.sdxl import SDXLBackbone
from masactrl_core.errors import ModelLoadError

__all__ = [
    "BACKBONES",
    "Backbone",
    "ConditionResiduals",
    "Conditioning",
    "backbone_class",
    "condition_family",
    "detect_family",
]

# Tried in this order by detect_family: the fallback last.
BACKBONES: dict[str, type[Backbone]] = {
    FluxBackbone.family: FluxBackbone,
    SD3Backbone.family: SD3Backbone,
    SDXLBackbone.family: SDXLBackbone,
    SDBackbone.family: SDBackbone,
}


def backbone_class(family: str) -> type[Backbone]:
    """The backbone of ``family``; :class:`ModelLoadError` for an unknown one."""
    try:
        return BACKBONES[family]
    except KeyError:
        raise ModelLoadError(
            f"unknown model family {family!r}; expected one of {', '.join(sorted(BACKBONES))}"
        ) from None


def detect_family(config: dict[str, Any]) -> str:
    """The family of a checkpoint from its ``model_index.json`` (``sd`` when nothing else fits)."""
    return next(family for family, backbone in BACKBONES.items() if backbone.recognizes(config))


def condition_family(kind: str, config: Mapping[str, Any]) -> str:
    """The family a ControlNet or T2I-Adapter config is made for (``sd`` when nothing else fits)."""
    return next(
        family
        for family, backbone in BACKBONES.items()
        if backbone.recognizes_condition(kind, config)
    )
