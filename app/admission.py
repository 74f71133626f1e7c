"""Admission control for the model endpoints: at most `max_active` requests are processed at once and
at most `max_waiting` more wait for a slot, first come first served; past both, the excess is refused
at once with 429 and `Retry-After` (TGI: "Model is overloaded") instead of a wait nobody can bound.
A request that got in always runs to its end: nothing here ever cancels one.

Before refusal comes degradation (app/degrade.py): a request that has to wait behind enough others
is admitted at a degradation level, left in the scope for its handler.

The slot is held for the whole ASGI call, so a streamed answer holds it until its last byte.
Plain bookkeeping on the event loop's thread (no locks): every caller runs on that one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from litestar.types import ASGIApp, Receive, Scope, Send

from app.degrade import set_request_degrade
from app.errors import send_error
from app.request_id import request_id_of
from app.metrics import Metrics

MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/classify"})


class Overloaded(Exception):
    """Every slot is taken and the queue is full."""


class AdmissionControl:
    def __init__(self, max_active: int, max_waiting: int) -> None:
        if max_active < 1 or max_waiting < 0:
            raise ValueError(f"need max_active >= 1 and max_waiting >= 0, got {max_active} and {max_waiting}")
        self.max_active, self.max_waiting = max_active, max_waiting
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def ahead(self) -> int:
        """How many requests a request arriving now would wait behind (0: a slot is free)."""
        return len(self._waiters) if self._waiters or self.active >= self.max_active else 0

    async def acquire(self) -> None:
        """Take a slot, waiting in line if need be; raises Overloaded when the line is full too."""
        if self.active < self.max_active and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise Overloaded
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(ticket)
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self.release()  # the slot was handed over just as we were cancelled: pass it on
            else:  # release() may have dropped the cancelled ticket already
                with contextlib.suppress(ValueError):
                    self._waiters.remove(ticket)
            raise

    def release(self) -> None:
        while self._waiters:  # hand the slot straight to the next in line: `active` stays the same
            ticket = self._waiters.popleft()
            if not ticket.done():
                ticket.set_result(None)
                return
        self.active -= 1


class AdmissionMiddleware:
    """Runs requests to `paths` (route templates) inside an admission slot; everything else passes."""

    def __init__(self, app: ASGIApp, admission: AdmissionControl, metrics: Metrics, retry_after_s: int,
                 paths: frozenset[str] = MODEL_PATHS, degrade_level: Callable[[int], int] | None = None) -> None:
        self.app, self.admission, self.metrics = app, admission, metrics
        self.retry_after_s, self.paths = retry_after_s, paths
        self.degrade_level = degrade_level  # requests waiting ahead -> the level it is admitted at

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path_template") not in self.paths:
            await self.app(scope, receive, send)
            return
        if self.degrade_level is not None:
            set_request_degrade(scope, self.degrade_level(self.admission.ahead))
        try:
            await self.admission.acquire()
        except Overloaded:
            self.metrics.rejections.labels("overloaded", "").inc()
            await send_error(send, 429, f"server overloaded: {self.admission.max_active} requests are being "
                             f"processed and {self.admission.max_waiting} are waiting; retry after "
                             f"{self.retry_after_s} s", "overloaded_error", "server_overloaded",
                             {"Retry-After": str(self.retry_after_s)}, request_id_of(scope))
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.release()
