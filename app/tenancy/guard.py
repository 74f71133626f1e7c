"""The app-level guard: after routing, on every route handler, in this order —

    scope       the handler's `opt["scope"]` (chat, embeddings, batches, admin): 403 without it
    quota       handlers with `opt["metered"]` (they spend model time) count one request against the
                key's persisted quotas: 429 insufficient_quota when a limit is reached
    rate limit  the key's token bucket (this process): 429 rate_limit_exceeded

The quota comes before the burst limit: a key out of quota hears so, not "slow down". Anonymous
requests (an open server) and unrouted paths (404) pass through none of these.
"""

from __future__ import annotations

import sqlite3

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from app.auth import Refusal
from app.errors import APIError
from app.tenancy.principal import principal_of, require_scope


def _refuse(connection: ASGIConnection, refusal: Refusal) -> APIError:
    metrics = connection.app.state.get("metrics")
    if metrics is not None:
        metrics.rejections.labels(refusal.reason, "").inc()
    return APIError(refusal.status, refusal.message, type=refusal.type, code=refusal.code,
                    headers={"Retry-After": str(refusal.retry_after_s)})


def tenancy_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    scope = handler.opt.get("scope")
    principal = require_scope(connection, scope) if scope is not None else principal_of(connection)
    if not principal.key_id:
        return
    state = connection.app.state
    quotas = state.get("quotas")
    if handler.opt.get("metered") and quotas is not None:
        try:
            refusal = quotas.admit(principal)
        except sqlite3.Error as e:
            raise APIError(503, f"the usage store is unavailable: {e}", type="server_error",
                           code="usage_store_unavailable", headers={"Retry-After": "5"}) from None
        if refusal is not None:
            raise _refuse(connection, refusal)
    limiter = state.get("rate_limiter")
    if limiter is not None and (refusal := limiter.admit(principal.key_id)) is not None:
        raise _refuse(connection, refusal)
