"""One HTTP request through an ASGI app in memory, its response streamed back in pieces: how a Ray Serve
replica runs the litestar app for the gateway (app/scale/ray_serve.py). Plain asyncio, no Ray.

The first piece is the head (status, headers), the rest the body's chunks, in order: a streamed chat
completion reaches the client as the engine makes it. A client that goes away is seen by the app as
`http.disconnect` once the caller stops reading (the generator is closed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from litestar.types import ASGIApp, Message


@dataclass(frozen=True, slots=True)
class HTTPCall:
    method: str
    path: str
    query: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] = ("127.0.0.1", 0)


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]


async def call(app: ASGIApp, request: HTTPCall) -> AsyncIterator[Head | bytes]:
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
             "query_string": request.query, "root_path": "", "headers": list(request.headers),
             "client": request.client, "server": ("127.0.0.1", 0)}
    out: asyncio.Queue[Head | bytes | None] = asyncio.Queue()
    body_sent, gone = False, asyncio.Event()

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            await out.put(Head(message["status"], tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ()))))
        elif message["type"] == "http.response.body":
            if message.get("body"):
                await out.put(bytes(message["body"]))
            if not message.get("more_body", False):
                gone.set()  # as a server does: once the response is complete, receive() says disconnect
                await out.put(None)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while (piece := await out.get()) is not None:
            yield piece
        await task  # an exception in the app after its last byte is raised here
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - the caller is gone; nothing to tell it
                pass
