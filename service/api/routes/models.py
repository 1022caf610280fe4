"""GET /v1/models: the catalog and which models have live workers."""

from __future__ import annotations

from fastapi import APIRouter

from masactrl_jobs.schema import (
    ConditionPublic,
    DefaultControl,
    LoraPublic,
    ModelList,
    ModelPublic,
)
from service.api.deps import GatewayDep, TenantDep
from service.api.responses import errors

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList, responses=errors(401, 503))
async def list_models(gateway: GatewayDep, tenant: TenantDep) -> ModelList:
    """List the models on offer, their sizes, block counts, control defaults, adapters, the
    features their family offers and live workers."""
    live = await gateway.store.live_models()
    entries = await gateway.model_entries()
    return ModelList(
        default=gateway.catalog.default,
        data=[
            ModelPublic(
                name=entry.name,
                family=entry.family,
                native_width=entry.native_width,
                native_height=entry.native_height,
                block_count=entry.block_count,
                size_multiple=entry.size_multiple,
                max_pixels=entry.max_pixels,
                default_control=DefaultControl(**entry.default_control),
                shape_source="measured" if entry.measured else "catalog",
                prediction_type=entry.measured.prediction_type if entry.measured else None,
                live=entry.name in live,
                preview_decoder="tiny_autoencoder" if entry.preview_vae else "vae",
                conditions=[
                    ConditionPublic(name=name, kind=condition.kind, family=condition.family)
                    for name, condition in sorted(entry.conditions.items())
                ],
                loras=[
                    LoraPublic(name=name, weight=lora.weight)
                    for name, lora in sorted(entry.loras.items())
                ],
                features=entry.features,
            )
            for entry in entries
        ],
    )
