"""POST /v1/embeddings (OpenAI's) and POST /v1/classify (mmserve's zero-shot labels)."""

from __future__ import annotations

import msgspec
from litestar import Controller, Request, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.auth import log_end_user
from app.embeddings.schemas import Classification, ClassifyRequest, EmbeddingList, EmbeddingRequest
from app.embeddings.service import EmbeddingService
from app.metrics import set_request_model
from app.tenancy.principal import principal_of, require_model
from app.tenancy.record import record_of


class EmbeddingsController(Controller):
    path = "/v1/embeddings"
    tags = ["embeddings"]
    opt = {"scope": "embeddings", "metered": True}

    @post(status_code=200, summary="Embed text and images (data: URLs) into a model's contrastive space")
    async def create(self, data: JSONBody[EmbeddingRequest], embeddings: NamedDependency[EmbeddingService],
                     request: Request) -> EmbeddingList:
        require_model(request, data.model or embeddings.registry.default)
        model = embeddings.model_for(data.model, "embeddings")
        set_request_model(request.scope, model.name)
        log_end_user(data.user)
        record = record_of(request)
        if record is not None:
            record.keep(input=msgspec.to_builtins(data.input))
        return await embeddings.embed(data, model, principal_of(request).cache_salt, record)


class ClassifyController(Controller):
    path = "/v1/classify"
    tags = ["classify"]
    opt = {"scope": "embeddings", "metered": True}

    @post(status_code=200, summary="Zero-shot labels for an image (the request's labels or the model's own)")
    async def create(self, data: JSONBody[ClassifyRequest], embeddings: NamedDependency[EmbeddingService],
                     request: Request) -> Classification:
        require_model(request, data.model or embeddings.registry.default)
        model = embeddings.model_for(data.model, "zero_shot")
        set_request_model(request.scope, model.name)
        record = record_of(request)
        if record is not None:
            record.keep(image=data.image, labels=data.labels)
        return await embeddings.classify(data, model, principal_of(request).cache_salt, record)
