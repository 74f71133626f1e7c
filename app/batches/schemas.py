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
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class CreateBatchRequest(msgspec.Struct):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


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


class Batch(msgspec.Struct):
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    request_counts: RequestCounts
    object: str = "batch"
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


class BatchList(msgspec.Struct):
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: str = "list"


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
