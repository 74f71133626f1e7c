"""Every error leaves the service in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import re

import msgspec
from litestar import Request, Response
from litestar.types import Send
from litestar.exceptions import HTTPException, ValidationException

from llm.scheduler import PromptRejected
from vision.intake import ImageError

log = logging.getLogger("mmserve")


class ErrorDetail(msgspec.Struct):
    """OpenAI's Error object: all four fields required, param and code nullable."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct, omit_defaults=True):
    error: ErrorDetail
    request_id: str | None = None  # the x-request-id of the request that failed (app/request_id.py)


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """The 400 every part of the API raises for a request it refuses: OpenAI's invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def error_response(request: Request | None, status: int, message: str, type: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> Response:
    """`request` None: an error with no HTTP request of its own (a batch line)."""
    request_id = request.scope.get("state", {}).get("mmserve_request_id") if request is not None else None
    return Response(ErrorBody(ErrorDetail(message, type, param, code), request_id), status_code=status,
                    headers=headers)


async def send_error(send: Send, status: int, message: str, type: str, code: str | None = None,
                     headers: dict[str, str] | None = None, request_id: str | None = None) -> None:
    """The same body, sent by ASGI middleware itself (auth, admission), so that the middleware around it
    (metrics) sees an ordinary response rather than an exception."""
    body = msgspec.json.encode(ErrorBody(ErrorDetail(message, type, None, code), request_id))
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), str(value).encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _api_error(request: Request, exc: APIError) -> Response:
    return error_response(request, exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


def _image_error(request: Request, exc: ImageError) -> Response:
    status = 413 if exc.code == "image_too_large" else 400
    return error_response(request, status, str(exc), "invalid_request_error", "messages", exc.code)


def _context_error(request: Request, exc: PromptRejected) -> Response:
    return error_response(request, 400, str(exc), "invalid_request_error", "messages", "context_length_exceeded")


UNKNOWN_FIELD = re.compile(r"Object contains unknown field `([^`]+)`")
BODY_ROOT = "data"  # litestar's `key` for an error at the top of the request body


def _validation_error(request: Request, exc: ValidationException) -> Response:
    extra = exc.extra if isinstance(exc.extra, list) else []
    entries = [e if isinstance(e, dict) else {"message": str(e)} for e in extra]
    for entry in entries:
        unknown = UNKNOWN_FIELD.search(str(entry.get("message", "")))
        if unknown:  # a parameter nobody documents: refused by name, never ignored
            key = entry.get("key")
            where = unknown.group(1) if key in (None, "", BODY_ROOT) else f"{key}.{unknown.group(1)}"
            return error_response(request, 400, f"unknown parameter: {where} is not part of this API",
                                  "invalid_request_error", where, "unsupported_parameter")
    messages = [f"{e.get('message')} at {e['key']}" if e.get("key") else str(e.get("message")) for e in entries]
    return error_response(request, 400, f"invalid request body: {'; '.join(messages) or exc.detail}",
                          "invalid_request_error", None, "invalid_body")


def _http_error(request: Request, exc: HTTPException) -> Response:
    # invalid_request_error: OpenAI's type for an unknown path or method too
    return error_response(request, exc.status_code, exc.detail, "invalid_request_error", None, None, exc.headers)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, 500, "internal server error", "server_error")


EXCEPTION_HANDLERS = {
    APIError: _api_error,
    ImageError: _image_error,
    PromptRejected: _context_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}


# What the OpenAPI schema says errors look like: OpenAI's shape, not litestar's default {status_code,
# detail}. Every route can answer these (auth and admission middleware sit in front of all of them).
ERROR_STATUSES = {400: "the request is invalid: the error names the parameter",
                  401: "no API key, or an unknown one", 403: "the key lacks the scope or model",
                  404: "no such resource", 413: "the body or an image is over its limit",
                  429: "over a rate limit or quota, or overloaded: see Retry-After",
                  503: "not ready or draining: see Retry-After"}


def document_errors(app) -> None:
    """Give every route the OpenAPI error responses it really sends (ErrorBody), before the schema is
    built at startup; a status a route documents itself is kept."""
    from litestar.openapi import ResponseSpec
    from litestar.routes import HTTPRoute

    specs = {status: ResponseSpec(ErrorBody, description=why) for status, why in ERROR_STATUSES.items()}
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            handler.responses = {**specs, **(handler.responses or {})}
