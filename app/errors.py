"""Every error leaves the service in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

import msgspec
from litestar import Request, Response
from litestar.types import Send
from litestar.exceptions import HTTPException, ValidationException

from app.schemas import ErrorBody, ErrorDetail
from llm.scheduler import PromptRejected
from vision.intake import ImageError

log = logging.getLogger("mmserve")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> Response:
    return Response(ErrorBody(ErrorDetail(message, type, param, code)), status_code=status, headers=headers)


async def send_error(send: Send, status: int, message: str, type: str, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    """The same body, sent by ASGI middleware itself (auth, admission), so that the middleware around it
    (metrics) sees an ordinary response rather than an exception."""
    body = msgspec.json.encode(ErrorBody(ErrorDetail(message, type, None, code)))
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode(), str(value).encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _api_error(_: Request, exc: APIError) -> Response:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


def _image_error(_: Request, exc: ImageError) -> Response:
    status = 413 if exc.code == "image_too_large" else 400
    return error_response(status, str(exc), "invalid_request_error", "messages", exc.code)


def _context_error(_: Request, exc: PromptRejected) -> Response:
    return error_response(400, str(exc), "invalid_request_error", "messages", "context_length_exceeded")


def _validation_error(_: Request, exc: ValidationException) -> Response:
    detail = exc.detail
    extra = exc.extra if isinstance(exc.extra, list) else []
    messages = [f"{e.get('message')} at {e.get('key')}" if isinstance(e, dict) and e.get("key") else
                str(e.get("message") if isinstance(e, dict) else e) for e in extra]
    message = "; ".join(messages) or detail
    return error_response(400, f"invalid request body: {message}", "invalid_request_error", None, "invalid_body")


def _http_error(_: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(exc.status_code, exc.detail, kind, None, None, exc.headers)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal server error", "server_error")


EXCEPTION_HANDLERS = {
    APIError: _api_error,
    ImageError: _image_error,
    PromptRejected: _context_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}
