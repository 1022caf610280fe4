"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.config import Tenant
from service.errors import ApiError
from service.gateway import Gateway

__all__ = ["GatewayDep", "IdempotencyKey", "Prefer", "TenantDep", "authenticate", "get_gateway"]


def get_gateway(request: Request) -> Gateway:
    """The app's :class:`Gateway`, built in its lifespan."""
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer <API key>`; each key belongs to one tenant.",
)


def authenticate(
    gateway: GatewayDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant whose key is in ``Authorization: Bearer``; 401 otherwise."""
    challenge = {"WWW-Authenticate": 'Bearer realm="masactrl"'}
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "unauthorized",
            "Send your API key as 'Authorization: Bearer <key>'.",
            headers=challenge,
        )
    # Keys are stored only as SHA-256 digests; hashing first also makes the lookup independent
    # of how much of a guessed key matches.
    digest = hashlib.sha256(credentials.credentials.encode()).hexdigest()
    tenant = gateway.tenants.get(digest)
    if tenant is None:
        raise ApiError(401, "unauthorized", "The API key is not valid.", headers=challenge)
    return tenant


TenantDep = Annotated[Tenant, Depends(authenticate)]

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Retry-safe submission: the same key and body return the original job.",
    ),
]
Prefer = Annotated[
    str | None,
    Header(
        max_length=200,
        description="`wait=N` (N ≤ 60) holds the response until the job ends or N seconds pass.",
    ),
]
