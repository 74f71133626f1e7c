from __future__ import annotations

from litestar import Controller, get

from app.runtime import ModelRuntime
from app.schemas import ModelCard, ModelList


class ModelsController(Controller):
    path = "/v1/models"
    tags = ["models"]

    @get(summary="The models this server serves")
    async def list_models(self, runtime: ModelRuntime, started_at: int) -> ModelList:
        return ModelList([ModelCard(runtime.name, started_at)])
