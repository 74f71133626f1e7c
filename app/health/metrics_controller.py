from __future__ import annotations

from litestar import Controller, Response, get
from litestar.di import NamedDependency

from app.metrics import CONTENT_TYPE, Metrics


class MetricsController(Controller):
    tags = ["health"]

    @get("/metrics", summary="Prometheus metrics (text exposition format)", media_type=CONTENT_TYPE)
    async def metrics(self, metrics: NamedDependency[Metrics]) -> Response[bytes]:
        return Response(metrics.render(), media_type=CONTENT_TYPE)
