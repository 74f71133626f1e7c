"""Who a request runs for: a key's tenant, scopes, model allow-list and limits.

The middleware (app/tenancy/middleware.py) identifies the key and leaves a `Principal` in the scope
state; a handler declares `opt={"scope": "chat"}` (checked by the app's `tenancy_guard` after routing,
so a path spelled oddly still needs the scope of the handler it reaches) or asks
`require_scope(request, "admin")` itself.

With no key configured anywhere the server is open (a local, single-user server, as before): every
request runs as ANONYMOUS, which holds every scope.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from app.errors import APIError

SCOPES = ("chat", "embeddings", "batches", "admin")
PRINCIPAL_STATE = "mmserve_principal"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key quotas; 0 = unlimited. Minute and UTC-day windows."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    images_per_minute: int = 0
    pixels_per_minute: int = 0
    requests_per_day: int = 0
    tokens_per_day: int = 0
    images_per_day: int = 0
    pixels_per_day: int = 0

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 0:
                raise ValueError(f"limit {name} must be >= 0, got {getattr(self, name)}")

    @property
    def any(self) -> bool:
        return any(getattr(self, name) for name in self.__slots__)


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str  # never the key: "key_<hex>" (store) or "env_<hex>" (env/file keys); "" = anonymous
    tenant: str  # "" = anonymous
    scopes: frozenset[str] = frozenset(SCOPES)
    models: frozenset[str] | None = None  # public model names this key may use; None = all
    limits: Limits = field(default_factory=Limits)

    @property
    def cache_salt(self) -> str | None:
        """The feature-cache salt: tenants never share cached image features (a hit would tell one
        tenant what another sent); None for the open server."""
        return hashlib.sha256(f"tenant:{self.tenant}".encode()).hexdigest() if self.tenant else None

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = Principal("", "")


def principal_of(request: Request | ASGIConnection) -> Principal:
    """The principal the middleware admitted; ANONYMOUS on an open server (no key configured)."""
    return request.scope.get("state", {}).get(PRINCIPAL_STATE, ANONYMOUS)


def require_scope(request: Request | ASGIConnection, scope: str) -> Principal:
    """The request's principal, or a 403 when its key lacks `scope`."""
    assert scope in SCOPES, f"unknown scope {scope!r}"
    principal = principal_of(request)
    if scope not in principal.scopes:
        raise APIError(403, f"this API key lacks the {scope!r} scope (it has: "
                       f"{', '.join(sorted(principal.scopes)) or 'none'})", type="permission_error",
                       code="insufficient_scope")
    return principal


def require_model(request: Request | ASGIConnection, model: str) -> None:
    """A 403 when the key's model allow-list leaves out `model` (the public name the request sent)."""
    principal = principal_of(request)
    if not principal.may_use(model):
        raise APIError(403, f"this API key may not use model {model!r} (allowed: "
                       f"{', '.join(sorted(principal.models or ())) or 'none'})", type="permission_error",
                       param="model", code="model_not_allowed")


def scope_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """A litestar guard: the handler's `opt["scope"]` is required. (The app-level `tenancy_guard`,
    app/tenancy/guard.py, already checks `opt["scope"]` on every route; this one is for a router or
    app built without it.)"""
    scope = handler.opt.get("scope")
    assert scope is not None, f"{handler} has scope_guard but no opt['scope']"
    require_scope(connection, scope)
