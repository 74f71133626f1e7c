from __future__ import annotations

from litestar import Controller, Request, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.auth import KeyAccess, api_key_of
from app.embeddings import EmbeddingService
from app.schemas import EmbeddingList, EmbeddingRequest


class EmbeddingsController(Controller):
    path = "/v1/embeddings"
    tags = ["embeddings"]

    @post(status_code=200, summary="Embed text and images (data: URLs) into the model's contrastive space")
    async def create(self, data: JSONBody[EmbeddingRequest], embeddings: NamedDependency[EmbeddingService],
                     access: NamedDependency[KeyAccess], request: Request) -> EmbeddingList:
        result = await embeddings.embed(data)
        access.charge(api_key_of(request), result.usage.total_tokens)
        return result
