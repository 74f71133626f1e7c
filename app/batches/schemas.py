"""Typed bodies of OpenAI's Files and Batches APIs, and the lines of batch input and output files."""

from __future__ import annotations

from typing import Literal

import msgspec

from app.chat.schemas import ChatCompletion
from app.errors import ErrorBody

CHAT_ENDPOINT = "/v1/chat/completions"  # the one endpoint a batch may target here
COMPLETION_WINDOW = "24h"  # the one window OpenAI offers

BatchStatus = Literal["validating", "in_progress", "finalizing", "completed", "cancelling", "cancelled", "failed"]
# Statuses the worker still has work to do in; the others are final.
ACTIVE_STATUSES: tuple[BatchStatus, ...] = ("validating", "in_progress", "finalizing", "cancelling")


class FileObject(msgspec.Struct):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    object: str = "file"
    status: str = "processed"  # required (and deprecated) in OpenAI's schema; a stored file is processed
    # OpenAI's optional expires_at and status_details are left out: files here never expire, and a file
    # that fails validation is refused at upload, never stored.


class FileList(msgspec.Struct):
    data: list[FileObject]
    # Required strings in OpenAI's schema, but an empty page has no ids: null then (tests/openai_contract.py).
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: str = "list"


class CreateBatchRequest(msgspec.Struct, forbid_unknown_fields=True):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict | None = None  # refused: output files here never expire


class RequestCounts(msgspec.Struct):
    total: int
    completed: int
    failed: int


class BatchError(msgspec.Struct):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct):
    data: list[BatchError]
    object: str = "list"


class Batch(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An optional field with no value is left out, never sent as null: OpenAI's schema types each as a
    plain integer, string or object. The required ones have no default, so omit_defaults never drops them."""

    id: str
    object: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    request_counts: RequestCounts
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    metadata: dict[str, str] | None = None


class BatchList(msgspec.Struct, kw_only=True, omit_defaults=True):
    object: str
    data: list[Batch]
    has_more: bool
    first_id: str | None = None  # optional in OpenAI's schema: left out of an empty page
    last_id: str | None = None


class InputLine(msgspec.Struct):
    """One line of a batch input file. The body stays raw: it is stored as sent and decoded again
    (as a ChatCompletionRequest) when the line runs."""

    custom_id: str
    method: str
    url: str
    body: msgspec.Raw


class LineResponse(msgspec.Struct):
    status_code: int
    request_id: str
    body: ChatCompletion | ErrorBody


class LineError(msgspec.Struct):
    code: str
    message: str


class OutputLine(msgspec.Struct):
    """One line of an output or error file, in OpenAI's shape: `response` when the request ran (any
    status), `error` when it never did (the batch was cancelled first)."""

    id: str
    custom_id: str
    response: LineResponse | None
    error: LineError | None
