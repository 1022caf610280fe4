"""Dependencies shared by the routes, as ``Annotated`` aliases."""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from masactrl_jobs.schema import JobKind
from service.api.contract import JOB_KIND
from service.bodies import media_type
from service.config import Tenant
from service.errors import ApiError, FieldError
from service.gateway import Gateway

__all__ = [
    "DirectRoute",
    "GatewayDep",
    "OpsAccess",
    "Prefer",
    "Submission",
    "TenantDep",
    "authenticate",
    "get_gateway",
    "submission_openapi",
    "tenant_for_key",
]


async def get_gateway(request: Request) -> Gateway:
    """The app's :class:`Gateway`, built in its lifespan."""
    # async on purpose: FastAPI runs a sync dependency in a worker thread, a hop per request.
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="`Authorization: Bearer <API key>`; each key belongs to one tenant.",
)


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="masactrl"'}


def tenant_for_key(gateway: Gateway, key: str | None) -> Tenant:
    """The tenant an API key belongs to; 401 when the key is missing or unknown."""
    if not key:
        raise ApiError(
            401,
            "unauthorized",
            "Send your API key as 'Authorization: Bearer <key>'.",
            headers=_CHALLENGE,
        )
    # Keys are stored only as SHA-256 digests; hashing first also makes the lookup independent
    # of how much of a guessed key matches.
    tenant = gateway.tenants.get(hashlib.sha256(key.encode()).hexdigest())
    if tenant is None:
        raise ApiError(401, "unauthorized", "The API key is not valid.", headers=_CHALLENGE)
    return tenant


async def authenticate(
    gateway: GatewayDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Tenant:
    """The tenant whose key is in ``Authorization: Bearer``; 401 otherwise."""
    return tenant_for_key(gateway, credentials.credentials if credentials else None)


TenantDep = Annotated[Tenant, Depends(authenticate)]


_ops_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="OpsToken",
    description="`Authorization: Bearer <ops token>`, needed only when MASACTRL_OPS_TOKEN is set.",
)


async def check_ops_token(
    gateway: GatewayDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_ops_bearer)],
) -> None:
    """Operational routes (/metrics, the API docs) are open unless ``ops_token`` is set."""
    token = gateway.settings.ops_token
    if token is None:
        return
    given = credentials.credentials if credentials else ""
    # Compared as digests in constant time: the token is a secret.
    if not hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(),
        hashlib.sha256(token.get_secret_value().encode()).digest(),
    ):
        raise ApiError(
            401,
            "unauthorized",
            "This route needs the operations token as 'Authorization: Bearer <token>'.",
            headers=_CHALLENGE,
        )


OpsAccess = Annotated[None, Depends(check_ops_token)]

# Longer Prefer headers are refused (422) on every route, as the OpenAPI document says.
PREFER_MAX_LENGTH = 200

Prefer = Annotated[
    str | None,
    Header(
        max_length=PREFER_MAX_LENGTH,
        description="`wait=N` (N ≤ 60) holds the response until the job ends or N seconds pass.",
    ),
]


@dataclass(frozen=True)
class Submission:
    """What a submission route needs from its request, read without FastAPI's dependency solver.

    Submissions are the hot path: solving the declared dependencies and header parameters cost
    more CPU than validating, recording and queueing the job, so the two submission routes read
    the request directly and describe the same parameters in their OpenAPI entry instead.
    """

    gateway: Gateway
    tenant: Tenant
    idempotency_key: str | None
    prefer: str | None
    media_type: str  # of the body, lowercase, without parameters ("" when none was sent)

    @classmethod
    def from_request(cls, request: Request) -> Submission:
        gateway: Gateway = request.app.state.gateway
        # One pass over the raw headers (ASGI names are lowercase; the first of repeats wins, as
        # in Starlette's Headers.get), rather than a scan of them for each header read.
        authorization = idempotency_key = prefer = content_type = None
        for name, value in request.scope["headers"]:
            if name == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif name == b"idempotency-key":
                if idempotency_key is None:
                    idempotency_key = value.decode("latin-1")
            elif name == b"prefer":
                if prefer is None:
                    prefer = value.decode("latin-1")
            elif name == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
        scheme, _, key = (authorization or "").partition(" ")
        tenant = tenant_for_key(gateway, key.strip() if scheme.lower() == "bearer" else None)
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise FieldError(
                ("header", "Idempotency-Key"), "must be 1 to 255 characters", "string_too_long"
            )
        if prefer is not None and len(prefer) > PREFER_MAX_LENGTH:
            raise FieldError(
                ("header", "Prefer"),
                f"must be at most {PREFER_MAX_LENGTH} characters",
                "string_too_long",
            )
        return cls(gateway, tenant, idempotency_key, prefer, media_type(content_type))


class DirectRoute(APIRoute):
    """A route whose endpoint takes only the :class:`Request` and returns a :class:`Response`.

    FastAPI's request handler (body sniffing, dependency solving, query parsing, response
    serialization) does nothing for such an endpoint but costs CPU on every request, so the
    endpoint is called directly; the OpenAPI entry, error handling and middleware are unchanged.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        if (
            dependant.dependencies
            or dependant.path_params
            or dependant.query_params
            or dependant.header_params
            or dependant.cookie_params
            or dependant.body_params
            or dependant.request_param_name is None
            or not inspect.iscoroutinefunction(self.endpoint)
        ):
            raise TypeError(f"{self.path}: a DirectRoute endpoint takes only the Request")
        return self.endpoint


SUBMISSION_PARAMETERS = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Retry-safe submission: the same key and body return the original job.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    },
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": "`wait=N` (N ≤ 60) holds the response until the job ends or N seconds pass.",
        "schema": {"type": "string", "maxLength": PREFER_MAX_LENGTH},
    },
]


def submission_openapi(kind: JobKind, content: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` of a submission route: its auth, headers and request body, and the kind
    of job it creates (whose rules ``service.api.contract`` adds to its description)."""
    return {
        JOB_KIND: kind.value,
        "security": [{"ApiKey": []}],
        "parameters": SUBMISSION_PARAMETERS,
        "requestBody": {"required": True, "content": content},
    }
