"""POST /v1/batches, GET /v1/batches[/{id}], POST /v1/batches/{id}/cancel (OpenAI's Batch API)."""

from __future__ import annotations

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, Parameter

from app.batches.schemas import Batch, BatchList, CreateBatchRequest
from app.batches.service import BatchService
from app.tenancy.principal import principal_of


class BatchesController(Controller):
    path = "/v1/batches"
    tags = ["batches"]
    opt = {"scope": "batches"}

    @post(status_code=200, summary="Run every request of an uploaded input file as one batch")
    async def create(self, data: JSONBody[CreateBatchRequest], batches: NamedDependency[BatchService],
                     request: Request) -> Batch:
        principal = principal_of(request)
        return await batches.create_batch(data, principal.tenant, principal.key_id)

    @get(summary="Batches, newest first")
    async def list_batches(self, batches: NamedDependency[BatchService], request: Request,
                           limit: int = Parameter(default=20, description="1 to 100"),
                           after: str | None = Parameter(default=None, description="the last id of the previous page"),
                           ) -> BatchList:
        return await batches.list_batches(limit, after, principal_of(request).tenant)

    @get("/{batch_id:str}", summary="A batch: status, request_counts, output and error file ids")
    async def retrieve(self, batch_id: FromPath[str], batches: NamedDependency[BatchService],
                       request: Request) -> Batch:
        return await batches.get_batch(batch_id, principal_of(request).tenant)

    @post("/{batch_id:str}/cancel", status_code=200, summary="Cancel a batch: requests not yet run never run")
    async def cancel(self, batch_id: FromPath[str], batches: NamedDependency[BatchService],
                     request: Request) -> Batch:
        return await batches.cancel(batch_id, principal_of(request).tenant)
