from __future__ import annotations

from litestar import Controller, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from app.embeddings import EmbeddingService
from app.schemas import Classification, ClassifyRequest


class ClassifyController(Controller):
    path = "/v1/classify"
    tags = ["classify"]

    @post(status_code=200, summary="Zero-shot labels for an image (the request's labels or the model's own)")
    async def create(self, data: JSONBody[ClassifyRequest],
                     embeddings: NamedDependency[EmbeddingService]) -> Classification:
        return await embeddings.classify(data)
