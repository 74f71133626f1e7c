"""The litestar app, built by a factory; its lifespan owns the model runtime."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import torch
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from app.chat import ChatService
from app.controllers.chat import ChatController
from app.controllers.health import HealthController
from app.controllers.models import ModelsController
from app.errors import EXCEPTION_HANDLERS
from app.runtime import ModelRuntime
from app.settings import Settings
from llm.async_engine import AsyncEngine


def create_app(settings: Settings, runtime: ModelRuntime | None = None) -> Litestar:
    """`runtime` may be passed in (tests share one loaded model); otherwise the lifespan loads it."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        loaded = runtime or ModelRuntime.from_dir(settings.model)
        app.state.runtime = loaded
        engine = AsyncEngine(loaded.new_engine(settings.engine_config))
        engine.start()
        app.state.engine = engine
        app.state.chat = ChatService(loaded, engine, settings)
        app.state.started_at = int(time.time())
        try:
            yield
        finally:
            engine.shutdown()

    def provide_runtime(state: State) -> ModelRuntime:
        return state.runtime

    def provide_chat(state: State) -> ChatService:
        return state.chat

    def provide_started_at(state: State) -> int:
        return state.started_at

    return Litestar(
        route_handlers=[ChatController, HealthController, ModelsController],
        dependencies={
            "runtime": Provide(provide_runtime, sync_to_thread=False),
            "chat": Provide(provide_chat, sync_to_thread=False),
            "started_at": Provide(provide_started_at, sync_to_thread=False),
        },
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="mmserve", version="0.1.0"),
    )
