"""POST /v1/embeddings (OpenAI's) and POST /v1/classify (mmserve's zero-shot labels)."""

from __future__ import annotations

from litestar import Controller, Request, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.auth import KeyAccess, api_key_of, log_end_user, tenant_of
from app.embeddings.schemas import Classification, ClassifyRequest, EmbeddingList, EmbeddingRequest
from app.embeddings.service import EmbeddingService
from app.metrics import set_request_model


class EmbeddingsController(Controller):
    path = "/v1/embeddings"
    tags = ["embeddings"]

    @post(status_code=200, summary="Embed text and images (data: URLs) into a model's contrastive space")
    async def create(self, data: JSONBody[EmbeddingRequest], embeddings: NamedDependency[EmbeddingService],
                     access: NamedDependency[KeyAccess], request: Request) -> EmbeddingList:
        key = api_key_of(request)
        model = embeddings.model_for(data.model, "embeddings")
        set_request_model(request.scope, model.name)
        log_end_user(data.user)
        result = await embeddings.embed(data, model, tenant_of(key))
        access.charge(key, result.usage.total_tokens)
        return result


class ClassifyController(Controller):
    path = "/v1/classify"
    tags = ["classify"]

    @post(status_code=200, summary="Zero-shot labels for an image (the request's labels or the model's own)")
    async def create(self, data: JSONBody[ClassifyRequest], embeddings: NamedDependency[EmbeddingService],
                     request: Request) -> Classification:
        model = embeddings.model_for(data.model, "zero_shot")
        set_request_model(request.scope, model.name)
        return await embeddings.classify(data, model, tenant_of(api_key_of(request)))
