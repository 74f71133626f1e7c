"""What the Files and Batches controllers call: request validation, the store reached off the event loop
(one dedicated thread, so one SQLite connection used by one thread at a time), and the worker's life.

If the database cannot be opened (a read-only data dir, a newer schema), the server still starts and
serves chat; the files and batches endpoints answer 503 naming the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from app.batches.input_file import InputFileError, parse_input_file
from app.batches.schemas import (CHAT_ENDPOINT, COMPLETION_WINDOW, Batch, BatchList, CreateBatchRequest, FileList,
                                 FileObject)
from app.batches.store import BatchStore
from app.batches.accounting import LineAccounting
from app.batches.worker import BatchWorker, ChatCompleter
from app.errors import APIError, bad_request
from app.settings import Settings
from app.tenancy.finalize import Finalizer
from app.tenancy.keys import Keys
from app.tenancy.quotas import QuotaStore

log = logging.getLogger("mmserve")
T = TypeVar("T")
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's metadata rules
MAX_FILES_PAGE = 10_000  # OpenAI's limit (and default) for GET /v1/files


def _not_found(what: str, ident: str, param: str | None = None) -> APIError:
    return APIError(404, f"no {what} with id {ident!r}", type="invalid_request_error", param=param,
                    code=f"{what}_not_found")


class BatchService:
    def __init__(self, settings: Settings, chat: ChatCompleter, keys: Keys | None = None,
                 quotas: QuotaStore | None = None, finalizer: Finalizer | None = None) -> None:
        """`keys`, `quotas`, `finalizer`: a batch's lines run as the key that made it, charged and audited
        (None: lines run unchecked, as the tests of the store and worker alone do)."""
        self.settings, self.chat = settings, chat
        self.keys, self.quotas, self.finalizer = keys, quotas, finalizer
        self.max_file_bytes = settings.max_file_bytes
        self.store: BatchStore | None = None
        self.worker: BatchWorker | None = None
        self.unavailable: str | None = "batch storage is not open yet"
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mmserve-batch-db")
        self._worker_task: asyncio.Task | None = None

    # -- life --------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store and start the worker, which resumes whatever a previous run left unfinished."""
        path = self.settings.batch_db_path
        try:
            self.store = await self._off_loop(BatchStore, path)
        except (OSError, sqlite3.Error) as e:
            self.unavailable = f"batch storage at {path} is unavailable: {e}"
            log.error("%s; the files and batches endpoints answer 503", self.unavailable)
            return
        self.unavailable = None
        self.worker = BatchWorker(self.store, self._off_loop, self.chat, self.settings.batch_concurrency,
                                  self.settings.max_batch_requests, self.settings.batch_lease_s,
                                  self.settings.batch_poll_s,
                                  accounting=LineAccounting(self.keys, self.quotas, self.finalizer))
        self._worker_task = asyncio.create_task(self.worker.run(), name="mmserve-batch-worker")

    async def stop(self) -> None:
        """Lines in flight are abandoned unanswered: they stay pending and run again at the next start."""
        if self._worker_task is not None:
            self._worker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker_task
        if self.store is not None:
            await self._off_loop(self.store.close)  # after any store call in progress
        self._thread.shutdown(wait=False)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _store(self) -> BatchStore:
        if self.store is None:
            raise APIError(503, self.unavailable or "batch storage is unavailable", type="server_error",
                           code="batch_storage_unavailable")
        return self.store

    # -- files -------------------------------------------------------------------------------------
    # Every call below takes the caller's tenant: another tenant's files and batches are not there (404).
    async def upload(self, filename: str, purpose: str, content: bytes, tenant: str = "") -> FileObject:
        store = self._store()
        if purpose != "batch":
            raise bad_request(f"purpose must be 'batch' (files here are batch inputs), got {purpose!r}", "purpose")
        if len(content) > self.max_file_bytes:
            raise APIError(413, f"the file is over the limit of {self.max_file_bytes} bytes "
                           f"(setting max_file_bytes)", param="file", code="file_too_large")
        try:
            await asyncio.to_thread(parse_input_file, content, self.settings.max_batch_requests)
        except InputFileError as e:
            raise bad_request(f"invalid batch input file: {e}", "file", "invalid_input_file") from None
        return await self._off_loop(store.add_file, filename, purpose, content, tenant)

    async def get_file(self, file_id: str, tenant: str = "") -> FileObject:
        file = await self._off_loop(self._store().get_file, file_id, tenant)
        if file is None:
            raise _not_found("file", file_id)
        return file

    async def list_files(self, purpose: str | None, limit: int, order: str, after: str | None,
                         tenant: str = "") -> FileList:
        if not 1 <= limit <= MAX_FILES_PAGE:
            raise bad_request(f"limit must be in 1..{MAX_FILES_PAGE}, got {limit}", "limit")
        if order not in ("asc", "desc"):
            raise bad_request(f"order must be 'asc' or 'desc', got {order!r}", "order")
        page, has_more = await self._off_loop(self._store().list_files, purpose, limit, order, after, tenant)
        return FileList(page, page[0].id if page else None, page[-1].id if page else None, has_more)

    async def file_content(self, file_id: str, tenant: str = "") -> bytes:
        content = await self._off_loop(self._store().file_content, file_id, tenant)
        if content is None:
            raise _not_found("file", file_id)
        return content

    # -- batches -----------------------------------------------------------------------------------
    async def create_batch(self, request: CreateBatchRequest, tenant: str = "", key_id: str = "") -> Batch:
        store = self._store()
        if request.endpoint != CHAT_ENDPOINT:
            raise bad_request(f"endpoint must be {CHAT_ENDPOINT!r}, the one endpoint batches run here; got "
                       f"{request.endpoint!r}", "endpoint", "unsupported_endpoint")
        if request.completion_window != COMPLETION_WINDOW:
            raise bad_request(f"completion_window must be {COMPLETION_WINDOW!r}, got {request.completion_window!r}",
                       "completion_window")
        if request.output_expires_after is not None:
            raise bad_request("output_expires_after is not supported: output and error files here never expire",
                       "output_expires_after", "unsupported_parameter")
        _check_metadata(request.metadata)
        file = await self._off_loop(store.get_file, request.input_file_id, tenant)
        if file is None:
            raise _not_found("file", request.input_file_id, "input_file_id")
        if file.purpose != "batch":
            raise bad_request(f"file {file.id!r} has purpose {file.purpose!r}; a batch reads a file uploaded with "
                       f"purpose 'batch'", "input_file_id")
        batch = await self._off_loop(store.add_batch, request, tenant, key_id)
        self.worker.wake()
        return batch

    async def get_batch(self, batch_id: str, tenant: str = "") -> Batch:
        batch = await self._off_loop(self._store().get_batch, batch_id, tenant)
        if batch is None:
            raise _not_found("batch", batch_id)
        return batch

    async def list_batches(self, limit: int, after: str | None, tenant: str = "") -> BatchList:
        if not 1 <= limit <= 100:
            raise bad_request(f"limit must be in 1..100, got {limit}", "limit")
        page, has_more = await self._off_loop(self._store().list_batches, limit, after, tenant)
        return BatchList(object="list", data=page, has_more=has_more, first_id=page[0].id if page else None,
                         last_id=page[-1].id if page else None)

    async def cancel(self, batch_id: str, tenant: str = "") -> Batch:
        batch = await self._off_loop(self._store().request_cancel, batch_id, tenant)
        if batch is None:
            raise _not_found("batch", batch_id)
        if batch.status not in ("cancelling", "cancelled"):
            raise APIError(409, f"batch {batch_id!r} is {batch.status}; only a validating or in-progress "
                           f"batch can be cancelled", code="batch_not_cancellable")
        self.worker.wake()
        return batch


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise bad_request(f"metadata holds {len(metadata)} pairs; at most {MAX_METADATA_PAIRS} are allowed", "metadata")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise bad_request(f"metadata keys are at most {MAX_METADATA_KEY} characters and values at most "
                       f"{MAX_METADATA_VALUE}; {key[:MAX_METADATA_KEY]!r} is over", "metadata")
