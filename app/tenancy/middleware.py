"""The key check on every path, and the one place every request ends.

It wraps litestar's whole handler (app/server.py), inside the request id and outside the router, so
a path no route serves, `//v1/...`, `/v1/../`, a percent-encoded or upper-case spelling all meet the
same check as a real route: only the exact probe paths below are open. (Middleware given to litestar
itself runs only for routed requests: an unknown path would slip past it.) Scopes are checked after
routing, by the handler reached (`tenancy_guard`), so an odd spelling cannot borrow another route's scope.

For every request that is not a probe it opens a `RequestRecord`, and `Finalizer.finish` closes it
exactly once: just before the response's last body message leaves, or when the request ends without
one (an exception, a client gone mid-stream). Refusals here (401) are recorded too. Scopes, quotas
and the rate limit are checked after routing (app/tenancy/guard.py): only the routes that spend model
time count against a key's quotas, so listing models or polling a batch does not eat its requests.
"""

from __future__ import annotations

import asyncio
import sqlite3

import msgspec

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import Refusal
from app.errors import send_error
from app.metrics import CLIENT_CLOSED, Metrics
from app.request_id import request_id_of
from app.tenancy.finalize import Finalizer
from app.tenancy.keys import Keys
from app.tenancy.principal import ANONYMOUS, PRINCIPAL_STATE
from app.tenancy.record import RECORD_STATE, RequestRecord

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapers, exactly these spellings
SCHEMA_PREFIX = "/schema"  # the OpenAPI documents


def is_open(path: str) -> bool:
    if path in OPEN_PATHS:
        return True
    return ((path == SCHEMA_PREFIX or path.startswith(SCHEMA_PREFIX + "/"))
            and "//" not in path and "/." not in path and "\\" not in path)


class _ErrorDetail(msgspec.Struct):
    code: str | None = None
    type: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


def _error_code(body: bytes) -> str:
    """The OpenAI error body's code (or type): what the audit records for a failed request."""
    try:
        error = msgspec.json.decode(body, type=_ErrorBody).error
        return error.code or error.type or "error"
    except msgspec.DecodeError:
        return "error"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class TenancyMiddleware:
    def __init__(self, app: ASGIApp, keys: Keys, finalizer: Finalizer, metrics: Metrics,
                 keep_content: bool = False) -> None:
        """`keep_content`: the setting audit_content (prompt text and images in the audit record)."""
        self.app, self.keys, self.keep_content = app, keys, keep_content
        self.finalizer, self.metrics = finalizer, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        record = RequestRecord("request", request_id_of(scope), scope["method"], scope["path"],
                               keep_content=self.keep_content)
        state = scope.setdefault("state", {})
        state[RECORD_STATE] = record

        async def finishing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] != "http.response.body":
                pass
            elif (record.status or 0) >= 400 and record.error_code is None:
                record.failed(_error_code(message.get("body", b"")))
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record.route = scope.get("path_template") or record.route
                self.finalizer.finish(record)  # before the last byte leaves: an answer implies its record
            await send(message)

        try:
            refusal = self._admit(scope, record)
            if refusal is not None:
                self.metrics.rejections.labels(refusal.reason, "").inc()
                headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else {}
                if refusal.retry_after_s:
                    headers["Retry-After"] = str(refusal.retry_after_s)
                record.failed(refusal.code)
                await send_error(finishing_send, refusal.status, refusal.message, refusal.type, refusal.code,
                                 headers, record.request_id)
                return
            state[PRINCIPAL_STATE] = record.principal
            await self.app(scope, receive, finishing_send)
        except asyncio.CancelledError:
            if record.status is None:
                record.status = CLIENT_CLOSED
            record.failed(record.error_code or "client_closed")
            raise
        finally:
            if not record.finalized:
                record.route = scope.get("path_template") or record.route
                if record.status is None:
                    record.status = 500
                elif record.status < 400 and record.error_code is None:
                    record.failed("incomplete")  # the response began but its end never left (a gone client)
                self.finalizer.finish(record)

    def _admit(self, scope: Scope, record: RequestRecord) -> Refusal | None:
        if not self.keys.enabled:
            record.principal = ANONYMOUS
            return None
        if self.keys.unavailable:
            return Refusal(503, "the key store is unavailable", "server_error", "key_store_unavailable",
                           "key_store_unavailable", 5)
        authorization = _header(scope, b"authorization")
        try:
            principal = self.keys.identify(authorization)
        except sqlite3.Error as e:
            return Refusal(503, f"the key store is unavailable: {e}", "server_error", "key_store_unavailable",
                           "key_store_unavailable", 5)
        if principal is None:
            return Refusal(401, "invalid API key" if authorization else
                           "missing API key: send the header 'Authorization: Bearer <key>'",
                           "invalid_request_error", "invalid_api_key", "unauthenticated", 0)
        record.principal = principal
        return None
