"""POST /v1/files (multipart: a JSONL batch input file), GET /v1/files (a page of them), GET /v1/files/{id}
and its content."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from litestar import Controller, Request, Response, Router, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath, Parameter

from app.batches.schemas import FileList, FileObject
from app.batches.service import MAX_FILES_PAGE, BatchService
from app.errors import APIError
from app.settings import Settings
from app.tenancy.principal import principal_of

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries, part headers and the `purpose` field around the file
UPLOAD_FIELDS = frozenset({"file", "purpose"})
REFUSED_UPLOAD_FIELDS = {"expires_after": "files here never expire"}  # OpenAI's, not offered


@dataclass
class FileUpload:
    # A plain dataclass form: litestar 2.25 answers 500 to a union with UploadFile.
    file: UploadFile
    purpose: str


class FilesController(Controller):
    path = "/v1/files"
    tags = ["files"]
    opt = {"scope": "batches"}

    @post(status_code=200, summary="Upload a batch input file (JSONL of chat requests; purpose 'batch')")
    async def upload(self, data: Annotated[FileUpload, Body(media_type=RequestEncodingType.MULTI_PART)],
                     batches: NamedDependency[BatchService], request: Request) -> FileObject:
        # A form field past file and purpose (OpenAI's expires_after, sent as expires_after[anchor] and
        # expires_after[seconds]) asks for what is not offered: refused by name, never ignored.
        extra = sorted({name.split("[")[0] for name in await request.form()} - UPLOAD_FIELDS)
        if extra:
            await data.file.close()
            why = REFUSED_UPLOAD_FIELDS.get(extra[0], "it is not part of this API")
            raise APIError(400, f"{extra[0]} is not supported: {why}", param=extra[0], code="unsupported_parameter")
        # One byte over the cap is enough to know the file is too large; the rest is never read.
        content = await data.file.read(batches.max_file_bytes + 1)
        await data.file.close()
        return await batches.upload(data.file.filename or "upload.jsonl", data.purpose, content,
                                    principal_of(request).tenant)

    @get(summary="Files, newest first (order=asc: oldest first), optionally of one purpose")
    async def list_files(self, batches: NamedDependency[BatchService], request: Request,
                         purpose: str | None = Parameter(default=None, description="only files of this purpose"),
                         limit: int = Parameter(default=MAX_FILES_PAGE, description=f"1 to {MAX_FILES_PAGE}"),
                         order: str = Parameter(default="desc", description="'asc' or 'desc', by created_at"),
                         after: str | None = Parameter(default=None, description="the last id of the previous page"),
                         ) -> FileList:
        return await batches.list_files(purpose, limit, order, after, principal_of(request).tenant)

    @get("/{file_id:str}", summary="A file's metadata")
    async def retrieve(self, file_id: FromPath[str], batches: NamedDependency[BatchService],
                       request: Request) -> FileObject:
        return await batches.get_file(file_id, principal_of(request).tenant)

    @get("/{file_id:str}/content", summary="A file's content (batch input, output or error JSONL)",
         media_type="application/jsonl")
    async def content(self, file_id: FromPath[str], batches: NamedDependency[BatchService],
                      request: Request) -> Response[bytes]:
        return Response(await batches.file_content(file_id, principal_of(request).tenant),
                        media_type="application/jsonl")


def files_router(settings: Settings) -> Router:
    """The files controller with its own body cap: batch input files may be larger than a chat request."""
    return Router("/", route_handlers=[FilesController],
                  request_max_body_size=settings.max_file_bytes + MULTIPART_OVERHEAD_BYTES)
