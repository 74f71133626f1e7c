"""POST /v1/chat/completions: a thin adapter over ChatService."""

from __future__ import annotations

import asyncio

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Stream

from app.auth import log_end_user
from app.chat.schemas import ChatCompletion, ChatCompletionRequest
from app.chat.service import ChatService, Routed
from app.degrade import DEGRADED_HEADER, request_degrade
from app.metrics import set_request_model
from app.tenancy.principal import principal_of, require_model
from app.tenancy.record import record_of

ROUTE_HEADER = "x-mmserve-route"  # which route answered: stage1, policy or decoder:<model>
MODEL_HEADER = "x-mmserve-model"  # which served model answered
VERSION_HEADER = "x-mmserve-model-version"  # which version of it (the canary's or the stable one)


def route_headers(routed: Routed) -> dict[str, str]:
    headers = {ROUTE_HEADER: routed.route, MODEL_HEADER: routed.model}
    if routed.version:
        headers[VERSION_HEADER] = routed.version
    if routed.degraded:
        headers[DEGRADED_HEADER] = ", ".join(routed.degraded)
    return headers


async def _until_disconnect(request: Request) -> None:
    """Return when the client goes away. The body is already read, so the next ASGI message is the
    disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ChatController(Controller):
    path = "/v1/chat/completions"
    tags = ["chat"]
    opt = {"scope": "chat", "metered": True}

    @post(status_code=200, summary="Create a chat completion over images and text (stream=true: server-sent events)")
    async def create(self, data: JSONBody[ChatCompletionRequest], chat: NamedDependency[ChatService],
                     request: Request) -> Response[ChatCompletion] | Stream:
        require_model(request, chat.metrics_label(data.model) or data.model)  # NAME@VERSION: NAME's allow-list
        tenant = principal_of(request).cache_salt
        record = record_of(request)  # hears the route, images and tokens: quotas and the audit
        if record is not None:
            record.keep(messages=msgspec.to_builtins(data.messages))
        set_request_model(request.scope, chat.metrics_label(data.model))
        degrade = request_degrade(request.scope)
        log_end_user(data.user, data.safety_identifier)

        if data.stream:
            # Litestar stops iterating when the client disconnects; closing the generator aborts the request.
            # (the content type goes in the headers: the handler's JSON media type would override media_type)
            events, routed = await chat.start_stream(data, record, tenant=tenant, degrade=degrade)
            set_request_model(request.scope, routed.model)
            return Stream(events, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **route_headers(routed)})
        # A client that hangs up on a non-streaming request aborts it too, freeing its KV blocks.
        work = asyncio.ensure_future(chat.complete(data, record, tenant=tenant, degrade=degrade))
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if gone.done() and not work.done():
            raise asyncio.CancelledError  # nobody to answer
        completion, routed = work.result()
        set_request_model(request.scope, routed.model)
        return Response(completion, headers=route_headers(routed))
