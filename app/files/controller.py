"""POST /v1/files (multipart: a JSONL batch input file), GET /v1/files/{id} and its content."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from litestar import Controller, Response, Router, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath

from app.batches.schemas import FileObject
from app.batches.service import BatchService
from app.settings import Settings

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and the `purpose` field around the file


@dataclass
class FileUpload:
    # A plain dataclass form: litestar 2.25 answers 500 to a union with UploadFile.
    file: UploadFile
    purpose: str


class FilesController(Controller):
    path = "/v1/files"
    tags = ["files"]

    @post(status_code=200, summary="Upload a batch input file (JSONL of chat requests; purpose 'batch')")
    async def upload(self, data: Annotated[FileUpload, Body(media_type=RequestEncodingType.MULTI_PART)],
                     batches: NamedDependency[BatchService]) -> FileObject:
        # One byte over the cap is enough to know the file is too large; the rest is never read.
        content = await data.file.read(batches.max_file_bytes + 1)
        await data.file.close()
        return await batches.upload(data.file.filename or "upload.jsonl", data.purpose, content)

    @get("/{file_id:str}", summary="A file's metadata")
    async def retrieve(self, file_id: FromPath[str], batches: NamedDependency[BatchService]) -> FileObject:
        return await batches.get_file(file_id)

    @get("/{file_id:str}/content", summary="A file's content (batch input, output or error JSONL)",
         media_type="application/jsonl")
    async def content(self, file_id: FromPath[str], batches: NamedDependency[BatchService]) -> Response[bytes]:
        return Response(await batches.file_content(file_id), media_type="application/jsonl")


def files_router(settings: Settings) -> Router:
    """The files controller with its own body cap: batch input files may be larger than a chat request."""
    return Router("/", route_handlers=[FilesController],
                  request_max_body_size=settings.max_file_bytes + MULTIPART_OVERHEAD_BYTES)
