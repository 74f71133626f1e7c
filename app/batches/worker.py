"""The batch worker: one task, started by the app's lifespan, that leases the oldest unfinished batch no
other worker holds and moves it along — validating -> in_progress -> finalizing -> completed, or
cancelling -> cancelled — then the next. Every state is in the store, so a restarted server picks up
where the killed one stopped: lines already answered stay answered, the others run.

Workers in other processes (Ray Serve replicas, a second server on the same data dir) share the store:
the lease (app/batches/store.py) gives each batch to one of them at a time. A heartbeat renews it
while the batch runs; if a renewal finds the lease taken over (this worker stalled past its expiry),
the batch's work here is cancelled at once and its unanswered lines are left to the new owner. With
nothing to do the worker looks again every `poll_s`, so a batch created through another replica, or
left by one that died, is found without a wake().

At most `batch_concurrency` lines of a batch are in flight at once, so a big batch leaves the engine's
other slots to interactive chat. A line is answered by the same `ChatService.complete` that serves
POST /v1/chat/completions; a request it refuses (APIError, a bad image, a context overflow) becomes an
error line with the status and body that request would have got on its own, and the batch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from typing import Awaitable, Callable, Protocol, TypeVar

import msgspec

from app.auth import Refusal
from app.batches.accounting import LineAccounting
from app.batches.input_file import InputFileError, decode_body, parse_input_file
from app.batches.schemas import Batch, BatchError, BatchStatus, LineResponse, OutputLine
from app.batches.store import BatchStore, LeaseLost
from app.errors import EXCEPTION_HANDLERS
from app.chat.schemas import ChatCompletion, ChatCompletionRequest
from app.errors import APIError, ErrorBody, ErrorDetail
from app.tenancy.record import RequestRecord, UsageObserver

log = logging.getLogger("mmserve")
T = TypeVar("T")
OffLoop = Callable[..., Awaitable[T]]  # runs a blocking store call on the database thread
RETRY_AFTER_STORE_ERROR_S = 5.0


class ChatCompleter(Protocol):
    async def complete(self, req: ChatCompletionRequest, observer: UsageObserver | None = None,
                       tenant: str | None = None) -> tuple[ChatCompletion, object]: ...


def error_of(exc: Exception) -> tuple[int, ErrorBody]:
    """The status and error body POST /v1/chat/completions answers the same failure with."""
    if isinstance(exc, msgspec.DecodeError):
        return 400, ErrorBody(ErrorDetail(f"invalid request body: {exc}", "invalid_request_error", "body"))
    for kind in type(exc).__mro__:
        if kind is Exception:
            break
        if kind in EXCEPTION_HANDLERS:  # the HTTP handlers for request errors never look at the request
            response = EXCEPTION_HANDLERS[kind](None, exc)
            return response.status_code, response.content
    log.error("batch request failed", exc_info=exc)
    return 500, ErrorBody(ErrorDetail("internal server error", "server_error"))


def worker_id() -> str:
    """Unique across hosts, processes and restarts, and readable in a log line: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def gone_from_this_host(owner: str) -> bool:
    """True when `owner` (a worker_id) ran on this host in a process that no longer exists: its lease
    can be taken at once. Owners on other hosts, or in another form, are left to their expiry."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class BatchWorker:
    def __init__(self, store: BatchStore, off_loop: OffLoop, chat: ChatCompleter, concurrency: int,
                 max_requests: int, lease_s: float = 30.0, poll_s: float = 2.0, owner: str | None = None,
                 accounting: LineAccounting | None = None) -> None:
        self.store, self.db, self.chat = store, off_loop, chat
        self.accounting = accounting or LineAccounting()
        self.concurrency, self.max_requests = concurrency, max_requests
        self.lease_s, self.poll_s = lease_s, poll_s
        self.owner = owner or worker_id()
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Something changed in the store (a new batch, a cancel): look again."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()  # before looking, so a wake() during the look is not lost
            batch: Batch | None = None
            try:
                claimed = await self.db(self.store.claim_batch, self.owner, self.lease_s, gone_from_this_host)
                if claimed is None:
                    # asyncio.timeout, not wait_for: 3.11's wait_for drops a cancel that lands as the wait ends
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_s):
                            await self._wake.wait()
                    continue
                batch, previous = claimed
                if previous is not None:
                    log.warning("batch worker %s: took over %s from %s (its lease expired)",
                                self.owner, batch.id, previous)
                await self._leased(batch)
            except LeaseLost:
                log.warning("batch worker %s: lost the lease on %s to another worker; left it to them",
                            self.owner, batch.id if batch else "?")
            except Exception as e:  # noqa: BLE001 - the worker outlives any one batch
                log.exception("batch worker: %s failed", batch.id if batch else "looking for work")
                await self._give_up_on(batch, e)

    async def _leased(self, batch: Batch) -> None:
        """Advance the batch one step while a heartbeat keeps its lease; give the lease back after (also
        when the worker is stopped, so another takes the batch over at once, not at the expiry)."""
        advance = asyncio.create_task(self._advance(batch), name=f"mmserve-batch-{batch.id}")
        lost = asyncio.Event()
        heartbeat = asyncio.create_task(self._heartbeat(batch.id, advance, lost))
        try:
            await advance
        except asyncio.CancelledError:
            if not lost.is_set() or asyncio.current_task().cancelling():
                raise
            raise LeaseLost(f"{self.owner} lost the lease on {batch.id}") from None
        finally:
            heartbeat.cancel()
            if not advance.done():  # we were cancelled while awaiting it: stop its lines too
                advance.cancel()
                with contextlib.suppress(BaseException):
                    await advance
            if not lost.is_set():
                await self.db(self.store.release_lease, batch.id, self.owner)

    async def _heartbeat(self, batch_id: str, advance: asyncio.Task, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            if not await self.db(self.store.renew_lease, batch_id, self.owner, self.lease_s):
                lost.set()
                advance.cancel()
                return

    async def _advance(self, batch: Batch) -> None:
        if batch.status == "validating":
            await self._validate(batch)
        elif batch.status == "in_progress":
            cancelled = await self._run_lines(batch.id)
            if not cancelled and await self.db(self.store.pending_lines, batch.id, 0, 1):
                return  # a line came back unanswered: the next pass runs it; completed means all answered
            if cancelled or not await self.db(self.store.move, batch.id, ("in_progress",), "finalizing"):
                await self.db(self.store.finalize, batch.id, "cancelling", "cancelled")
            else:
                await self.db(self.store.finalize, batch.id, "finalizing", "completed")
        elif batch.status == "finalizing":
            await self.db(self.store.finalize, batch.id, "finalizing", "completed")
        elif batch.status == "cancelling":
            await self.db(self.store.finalize, batch.id, "cancelling", "cancelled")

    async def _validate(self, batch: Batch) -> None:
        tenant, _ = await self.db(self.store.owner, batch.id)
        content = await self.db(self.store.file_content, batch.input_file_id, tenant)
        try:
            if content is None:
                raise InputFileError(f"input file {batch.input_file_id!r} no longer exists")
            # Parsing a large file takes a while: off the loop, and off the database thread too.
            lines = await asyncio.to_thread(parse_input_file, content, self.max_requests, batch.endpoint)
        except InputFileError as e:
            await self.db(self.store.fail_batch, batch.id, [BatchError("invalid_input_file", str(e), line=e.line)])
            return
        await self.db(self.store.start_batch, batch.id, lines)  # False: cancelled meanwhile; the loop sees it

    async def _run_lines(self, batch_id: str) -> bool:
        """Answer the batch's pending lines, `concurrency` at a time; True if a cancel stopped it.
        Lines already in flight when the cancel is seen still finish and keep their answers."""
        slots = asyncio.Semaphore(self.concurrency)
        cancelled = lost = False
        _, key_id = await self.db(self.store.owner, batch_id)

        async def run_one(line_no: int, custom_id: str, body: bytes) -> None:
            nonlocal cancelled, lost
            try:
                record, refusal = self.accounting.start(key_id, batch_id, custom_id, f"req_{uuid.uuid4().hex}")
                status_code, result = await self._answer(custom_id, body, record, refusal)
                status, stored = await self.db(self.store.answer_line, batch_id, line_no, status_code, result,
                                               self.owner)
                if stored:  # after the answer is stored, and only the stored one: never twice
                    self.accounting.finish(record, status_code)
                cancelled = cancelled or status != "in_progress"
            except LeaseLost:
                cancelled = lost = True  # stop starting lines; those in flight find out the same way
            finally:
                slots.release()

        after = 0
        async with asyncio.TaskGroup() as lines:
            while not cancelled:
                page = await self.db(self.store.pending_lines, batch_id, after, 4 * self.concurrency)
                if not page:
                    break
                for line_no, custom_id, body in page:
                    await slots.acquire()
                    if cancelled:
                        slots.release()
                        break
                    lines.create_task(run_one(line_no, custom_id, body))
                after = page[-1][0]
        if lost:
            raise LeaseLost(f"{self.owner} lost the lease on {batch_id}")
        return cancelled

    async def _answer(self, custom_id: str, body: bytes, record: RequestRecord,
                      refusal: Refusal | None) -> tuple[int, bytes]:
        request_id = record.request_id
        try:
            if refusal is not None:
                raise APIError(refusal.status, refusal.message, type=refusal.type, code=refusal.code)
            answer, _ = await self.chat.complete(decode_body(body), record, tenant=record.principal.cache_salt)
            response = LineResponse(200, request_id, answer)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # the worker is stopping: the line stays pending
            # cancelled inside the chat service, not by us: an answer still, so the line is not rerun for ever
            response = LineResponse(503, request_id, ErrorBody(ErrorDetail(
                "the request was cancelled inside the server", "server_error", code="request_cancelled")))
        except Exception as e:  # noqa: BLE001 - one bad request is an error line, never the end of the batch
            status_code, error = error_of(e)
            record.failed(error.error.code or error.error.type)
            response = LineResponse(status_code, request_id, error)
        line = OutputLine(f"batch_req_{uuid.uuid4().hex}", custom_id, response, None)
        return response.status_code, msgspec.json.encode(line)

    async def _give_up_on(self, batch: Batch | None, exc: Exception) -> None:
        """An unexpected failure (not a bad request: those are error lines). Mark the batch failed so the
        worker moves on; if even that fails the store is in trouble (disk full, locked): wait, retry."""
        if batch is not None:
            try:
                await self.db(self.store.fail_batch, batch.id,
                              [BatchError("internal_error", f"the batch stopped on an internal error: {exc}")])
                return
            except Exception:  # noqa: BLE001
                log.exception("batch worker: could not mark %s failed", batch.id)
        await asyncio.sleep(RETRY_AFTER_STORE_ERROR_S)
