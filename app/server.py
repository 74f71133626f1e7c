"""The litestar app, built by a factory; its lifespan starts the served models (engines, vision stages).

    models = load_models(settings)        # [(entry, family model)]: the CLI loads them first, so a bad
                                          # directory is a one-line error before anything listens
    app = create_app(settings, models)    # tests pass models they share between apps
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

import torch
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from app.admission import AdmissionControl, AdmissionMiddleware
from app.auth import RateLimiter
from app.batches.controller import BatchesController
from app.batches.service import BatchService
from app.canary.control import CanaryControl
from app.canary.controller import CanaryController
from app.canary.policy import canary_policies
from app.chat.controller import ChatController
from app.chat.service import ChatService
from app.degrade import degrade_level
from app.embeddings.controller import ClassifyController, EmbeddingsController
from app.embeddings.service import EmbeddingService
from app.errors import EXCEPTION_HANDLERS, document_errors
from app.files.controller import files_router
from app.health.controller import HealthController
from app.health.metrics_controller import MetricsController
from app.lifecycle import Readiness, warm_up
from app.metrics import Metrics, MetricsMiddleware
from app.models.controller import ModelsController
from app.models.entry import ModelEntry, memory_shares
from app.models.families import FamilyModel, load_family_model
from app.models.registry import ModelRegistry
from app.models.served import ServedModel
from app.request_id import RequestIdMiddleware
from app.routing.staged import StagedRouter
from app.settings import Settings
from llm.hardware import resolve_dtype
from llm.quant.scheme import QuantScheme
from app.tenancy.controller import AdminKeysController, UsageController
from app.tenancy.finalize import Finalizer
from app.tenancy.guard import tenancy_guard
from app.tenancy.keys import default_limits
from app.tenancy.middleware import TenancyMiddleware
from app.tenancy.stores import open_stores

LoadedModels = list[tuple[ModelEntry, FamilyModel]]


def load_models(settings: Settings) -> LoadedModels:
    """Every entry's checkpoint, loaded (raises ModelDirError / ModelEntryError naming the problem)."""
    def quantize(entry: ModelEntry) -> QuantScheme | None:
        text = entry.quantize or settings.quantize
        return QuantScheme.parse(text) if text else None

    return [(entry, load_family_model(entry.path, entry.family, settings.max_model_len or None,
                                      resolve_dtype(entry.dtype or settings.dtype), quantize(entry)))
            for entry in settings.model_entries()]


def build_registry(settings: Settings, models: LoadedModels) -> ModelRegistry:
    shares = memory_shares([entry for entry, _ in models])
    served = [ServedModel(entry, model, settings, share) for (entry, model), share in zip(models, shares)]
    return ModelRegistry(served, settings.router_alias, settings.default_model)


def build_router(settings: Settings, registry: ModelRegistry) -> StagedRouter:
    """Stage 1 and the policy labels answer from one served model's contrastive towers: the one
    `router_zero_shot_model` names, else the first that has them (none: no stage 1, no policy)."""
    able = [m for m in registry if m.capabilities.zero_shot]
    if settings.router_zero_shot_model:
        chosen = registry.get(settings.router_zero_shot_model)
        if chosen is None or chosen not in able:
            raise ValueError(f"setting router_zero_shot_model={settings.router_zero_shot_model!r} names no served "
                             f"model with zero-shot labels; those that have them: "
                             f"{', '.join(m.name for m in able) or 'none'}")
    else:
        chosen = able[0] if able else None
    return StagedRouter.build(settings, chosen.model if chosen else None, registry.names(),
                              zero_shot_name=chosen.name if chosen else None)


def create_app(settings: Settings, models: LoadedModels | FamilyModel | None = None) -> Litestar:
    """`models` may be passed in (tests share loaded models; one FamilyModel is served under its own
    name); otherwise the settings' entries are loaded here."""
    if models is None:
        models = load_models(settings)
    elif not isinstance(models, list):
        models = [(ModelEntry("", settings.model), models)]
    # Guards and observability exist before the lifespan runs: middleware and the SIGTERM drain use them.
    metrics, readiness = Metrics(), Readiness()
    # Tenancy: keys (env/file + the SQLite store), quotas and the audit log, all shared by a host's workers.
    stores = open_stores(settings)
    keys, quotas, audit = stores.keys, stores.quotas, stores.audit  # audit: AuditWriter, `audit.write(record)`
    finalizer = Finalizer(quotas, audit)
    admission = AdmissionControl(settings.max_concurrent_requests, settings.max_queued_requests)
    metrics.watch_admission(lambda: admission.active, lambda: admission.waiting)
    registry = build_registry(settings, models)
    router = build_router(settings, registry)
    canary = CanaryControl(registry, canary_policies(settings), settings, metrics,
                           on_event=lambda event: audit.write({"kind": "canary", **event}))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        for served in registry.versions():
            served.start(metrics)
        app.state.chat = ChatService(registry, router, settings, metrics, canary)
        app.state.embeddings = EmbeddingService(registry, settings)
        warming = asyncio.create_task(warm_up(readiness, app.state.chat, app.state.embeddings))
        app.state.batches = BatchService(settings, app.state.chat, keys, quotas, finalizer)
        await app.state.batches.start()  # resumes batches a previous run left unfinished
        try:
            yield
        finally:
            warming.cancel()
            await app.state.batches.stop()  # before the engines: lines in flight stay pending, rerun next start
            await app.state.chat.shadows.close()
            for served in registry.versions():
                served.stop()

    def provide_chat(state: State) -> ChatService:
        return state.chat

    def provide_embeddings(state: State) -> EmbeddingService:
        return state.embeddings

    def provide_batches(state: State) -> BatchService:
        return state.batches

    app = Litestar(
        route_handlers=[ChatController, HealthController, ModelsController, EmbeddingsController, ClassifyController,
                        MetricsController, files_router(settings), BatchesController, UsageController,
                        AdminKeysController, CanaryController],
        dependencies={
            "chat": Provide(provide_chat, sync_to_thread=False),
            "embeddings": Provide(provide_embeddings, sync_to_thread=False),
            "batches": Provide(provide_batches, sync_to_thread=False),
            "registry": Provide(lambda: registry, sync_to_thread=False),
            "metrics": Provide(lambda: metrics, sync_to_thread=False),
            "keys": Provide(lambda: keys, sync_to_thread=False),
            "quotas": Provide(lambda: quotas, sync_to_thread=False),
            "settings_limits": Provide(lambda: default_limits(settings), sync_to_thread=False),
            "readiness": Provide(lambda: readiness, sync_to_thread=False),
            "canary": Provide(lambda: canary, sync_to_thread=False),
            "audit": Provide(lambda: audit, sync_to_thread=False),
        },
        lifespan=[lifespan],
        state=State({"metrics": metrics, "readiness": readiness, "registry": registry, "canary": canary,
                     "audit": audit, "quotas": quotas, "rate_limiter": RateLimiter.from_settings(settings)}),
        guards=[tenancy_guard],  # scope, quota and rate limit of the route reached (app/tenancy/guard.py)
        # Outermost first: metrics see every routed answer. (The key check wraps the whole handler, below.)
        middleware=[DefineMiddleware(MetricsMiddleware, metrics=metrics),
                    DefineMiddleware(AdmissionMiddleware, admission=admission, metrics=metrics,
                                     retry_after_s=settings.overload_retry_after_s,
                                     degrade_level=lambda ahead: degrade_level(settings, ahead))],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="mmserve", version="0.1.0"),
    )
    # The request id wraps litestar's own handler (router and exception handling), not the routes: a
    # path or method no route serves (404, 405) gets its id too, in the header and the error body.
    # The key check and the request's end (quota charged, audit written) wrap it too, inside the id: every
    # path meets the same check, however it is spelled (app/tenancy/middleware.py).
    tenancy = TenancyMiddleware(app.asgi_handler, keys, finalizer, metrics, keep_content=settings.audit_content)
    app.asgi_handler = RequestIdMiddleware(tenancy)
    document_errors(app)
    return app
