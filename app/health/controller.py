from __future__ import annotations

from litestar import Controller, Response, get
from litestar.di import NamedDependency

from app.lifecycle import Readiness


class HealthController(Controller):
    tags = ["health"]

    @get("/health", summary="The process is alive")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/ready", summary="The model is loaded and warmed and the server is not draining (503 otherwise)")
    async def ready(self, readiness: NamedDependency[Readiness]) -> Response[dict[str, str]]:
        body = {"status": readiness.status}
        if readiness.failure:
            body["reason"] = readiness.failure
        return Response(body, status_code=200 if readiness.ready else 503)
