"""The litestar app, built by a factory; its lifespan owns the model runtime."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import torch
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from app.admission import AdmissionControl, AdmissionMiddleware
from app.auth import AuthMiddleware, KeyAccess
from app.batches.service import BatchService
from app.chat import ChatService
from app.controllers.batches import BatchesController
from app.controllers.files import files_router
from app.controllers.chat import ChatController
from app.controllers.health import HealthController
from app.controllers.models import ModelsController
from app.controllers.classify import ClassifyController
from app.controllers.embeddings import EmbeddingsController
from app.controllers.metrics import MetricsController
from app.embeddings import EmbeddingService
from app.lifecycle import Readiness, warm_up
from app.metrics import Metrics, MetricsMiddleware
from app.errors import EXCEPTION_HANDLERS
from app.runtime import ModelRuntime
from app.router import StagedRouter
from app.settings import Settings
from vision.stage import VisionStage
from llm.async_engine import AsyncEngine


def create_app(settings: Settings, runtime: ModelRuntime | None = None) -> Litestar:
    """`runtime` may be passed in (tests share one loaded model); otherwise the lifespan loads it."""
    # Guards and observability exist before the lifespan runs: middleware and the SIGTERM drain use them.
    metrics, access, readiness = Metrics(), KeyAccess.from_settings(settings), Readiness()
    admission = AdmissionControl(settings.max_concurrent_requests, settings.max_queued_requests)
    metrics.watch_admission(lambda: admission.active, lambda: admission.waiting)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        loaded = runtime or ModelRuntime.from_dir(settings.model)
        app.state.runtime = loaded
        def on_engine_error(error: Exception) -> None:
            if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
                metrics.record_oom()

        engine = AsyncEngine(loaded.new_engine(settings.engine_config, settings.dtype), on_step=metrics.observe_engine_step,
                             on_error=on_engine_error)
        metrics.bind_engine(engine.engine.stats)
        engine.start()
        app.state.engine = engine
        vision = VisionStage(loaded.encoder, settings.vision_stage_config)
        router = StagedRouter.build(settings, loaded)
        app.state.chat = ChatService(loaded, engine, vision, settings, metrics, router)
        app.state.started_at = int(time.time())
        app.state.embeddings = EmbeddingService(loaded, settings)
        warming = asyncio.create_task(warm_up(readiness, app.state.chat, app.state.embeddings))
        app.state.batches = BatchService(settings, app.state.chat)
        await app.state.batches.start()  # resumes batches a previous run left unfinished
        try:
            yield
        finally:
            warming.cancel()
            await app.state.batches.stop()  # before the engine: lines in flight stay pending, rerun next start
            engine.shutdown()
            vision.close()

    def provide_runtime(state: State) -> ModelRuntime:
        return state.runtime

    def provide_chat(state: State) -> ChatService:
        return state.chat

    def provide_started_at(state: State) -> int:
        return state.started_at

    def provide_embeddings(state: State) -> EmbeddingService:
        return state.embeddings

    def provide_batches(state: State) -> BatchService:
        return state.batches

    return Litestar(
        route_handlers=[ChatController, HealthController, ModelsController, EmbeddingsController, ClassifyController,
                        MetricsController, files_router(settings), BatchesController],
        dependencies={
            "runtime": Provide(provide_runtime, sync_to_thread=False),
            "chat": Provide(provide_chat, sync_to_thread=False),
            "started_at": Provide(provide_started_at, sync_to_thread=False),
            "embeddings": Provide(provide_embeddings, sync_to_thread=False),
            "batches": Provide(provide_batches, sync_to_thread=False),
            "metrics": Provide(lambda: metrics, sync_to_thread=False),
            "access": Provide(lambda: access, sync_to_thread=False),
            "readiness": Provide(lambda: readiness, sync_to_thread=False),
        },
        lifespan=[lifespan],
        state=State({"metrics": metrics, "readiness": readiness}),
        # Outermost first: metrics see every answer, the key is checked before a request takes a slot.
        middleware=[DefineMiddleware(MetricsMiddleware, metrics=metrics),
                    DefineMiddleware(AuthMiddleware, access=access, metrics=metrics),
                    DefineMiddleware(AdmissionMiddleware, admission=admission, metrics=metrics,
                                     retry_after_s=settings.overload_retry_after_s)],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="mmserve", version="0.1.0"),
    )
