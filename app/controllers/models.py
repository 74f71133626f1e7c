from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from app.runtime import ModelRuntime
from app.schemas import ModelCard, ModelList


class ModelsController(Controller):
    path = "/v1/models"
    tags = ["models"]

    @get(summary="The models this server serves")
    async def list_models(self, runtime: NamedDependency[ModelRuntime],
                          started_at: NamedDependency[int]) -> ModelList:
        return ModelList([ModelCard(runtime.name, started_at)])
