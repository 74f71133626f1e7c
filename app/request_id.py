"""One request id end to end: taken from the client's `x-request-id` (validated) or minted here,
returned on every response (`x-request-id`), in error bodies (`request_id`) and in every log line
written while the request runs (a context variable the `mmserve` logger's filter reads).

It wraps litestar's whole handler (app/server.py), outside the router and every middleware, so even a
401, a 404 path, a 405 method or a 413 carries it."""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import send_error

HEADER = b"x-request-id"
STATE_KEY = "mmserve_request_id"
VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
current: contextvars.ContextVar[str] = contextvars.ContextVar("mmserve_request_id", default="-")


def request_id_of(scope: Scope) -> str | None:
    return scope.get("state", {}).get(STATE_KEY)


def current_id() -> str | None:
    """The id of the request this code runs for (None outside one: a batch line, a warm-up)."""
    value = current.get()
    return None if value == "-" else value


class RequestIdFilter(logging.Filter):
    """Puts the running request's id on each record as `request_id` ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get()
        return True


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(HEADER)
        request_id = f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})[STATE_KEY] = request_id
        if given is not None:
            text = given.decode("latin-1")
            if not VALID.match(text):
                await send_error(_with_id(send, request_id), 400, "the x-request-id header must be 1 to 128 letters, "
                                 "digits or ._:- characters", "invalid_request_error", "invalid_request_id",
                                 request_id=request_id)
                return
            request_id = text
            scope["state"][STATE_KEY] = request_id
        token = current.set(request_id)
        try:
            await self.app(scope, receive, _with_id(send, request_id))
        finally:
            current.reset(token)


def _with_id(send: Send, request_id: str) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != HEADER]
            message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
        await send(message)
    return sending
