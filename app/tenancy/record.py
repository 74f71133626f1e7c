"""What one request (or one batch line) leaves behind for its audit record and its quota charge.

The tenancy middleware opens a `RequestRecord` for every request and puts it in the scope state; the
services fill it as the request runs (through the `UsageObserver` methods: which model and route, the
images, the first token, the final token counts), and `finalize` (app/tenancy/finalize.py) closes it:
quota charged, audit record written. Never prompt text or images, unless the setting audit_content
asks for them (`content`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from litestar import Request

from app.tenancy.principal import ANONYMOUS, Principal

RECORD_STATE = "mmserve_request_record"
MAX_PATH_CHARS = 256  # an unknown path is recorded as sent, cut here


class UsageObserver(Protocol):
    """What the chat and embedding services report about a request while it runs."""

    def image(self, digest: str, pixels: int) -> None: ...

    def routed(self, model: str, version: str, route: str = "", reason: str = "") -> None: ...

    def first_token(self) -> None: ...

    def finished(self, prompt_tokens: int, completion_tokens: int, finish_reason: str | None) -> None: ...

    def failed(self, code: str | None) -> None: ...


@dataclass
class RequestRecord:
    kind: str  # "request" | "batch_line"
    request_id: str | None
    method: str
    path: str  # as sent; `route` (the matched template) is preferred in the record when known
    principal: Principal = ANONYMOUS
    route: str | None = None
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    model: str = ""
    model_version: str = ""
    router_route: str = ""
    router_reason: str = ""
    images: dict[str, int] = field(default_factory=dict)  # image sha256 -> pixels, in order of first use
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error_code: str | None = None
    ttft_s: float | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    content: dict[str, Any] | None = None  # prompt text / image URLs, only when audit_content is on
    keep_content: bool = False  # the setting audit_content: `keep` stores what it is given
    finalized: bool = False

    # -- UsageObserver ---------------------------------------------------------------------------------
    def image(self, digest: str, pixels: int) -> None:
        self.images.setdefault(digest, pixels)

    def routed(self, model: str, version: str, route: str = "", reason: str = "") -> None:
        self.model, self.model_version, self.router_route, self.router_reason = model, version, route, reason

    def first_token(self) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started

    def finished(self, prompt_tokens: int, completion_tokens: int, finish_reason: str | None) -> None:
        self.prompt_tokens, self.completion_tokens, self.finish_reason = prompt_tokens, completion_tokens, finish_reason

    def failed(self, code: str | None) -> None:
        self.error_code = code or "error"

    def keep(self, **content: Any) -> None:
        """The request's content (JSON-able), recorded only when the setting audit_content asks for it."""
        if self.keep_content:
            self.content = {**(self.content or {}), **content}

    # -- the record ----------------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def pixels(self) -> int:
        return sum(self.images.values())

    def audit(self) -> dict[str, Any]:
        latency = time.perf_counter() - self.started
        record: dict[str, Any] = {
            "kind": self.kind, "request_id": self.request_id, "tenant": self.principal.tenant,
            "key_id": self.principal.key_id, "method": self.method,
            "route": self.route or self.path[:MAX_PATH_CHARS], "status": self.status,
            "model": self.model, "model_version": self.model_version,
            "router_route": self.router_route, "router_reason": self.router_reason,
            "image_digests": list(self.images), "images": len(self.images), "pixels": self.pixels,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason, "error_code": self.error_code,
            "latency_ms": round(latency * 1000, 3),
            "ttft_ms": round(self.ttft_s * 1000, 3) if self.ttft_s is not None else None,
        }
        if self.kind == "batch_line":
            record["batch_id"], record["custom_id"] = self.batch_id, self.custom_id
        if self.content is not None:
            record["content"] = self.content
        return record


def record_of(request: Request) -> RequestRecord | None:
    """The request's record (None outside the tenancy middleware: an app built without it)."""
    return request.scope.get("state", {}).get(RECORD_STATE)
