"""Shadow copies: the canary answers a copy of a request in the background while the stable version
answers the client. The copy's outcome and latency count (metrics, the canary's window) and its answer
is dropped. At most `canary_shadow_max_in_flight` copies run at once (a copy past that is skipped and
counted as outcome "skipped"): shadowing must never load the server more than the operator allowed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine

from app.canary.control import CanaryControl, counts_as_error
from app.models.served import ServedModel

log = logging.getLogger("mmserve")


class ShadowRunner:
    def __init__(self, max_in_flight: int, canary: CanaryControl | None) -> None:
        self.max_in_flight, self.canary = max_in_flight, canary
        self._tasks: set[asyncio.Task] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def start(self, served: ServedModel, copy: Coroutine) -> None:
        """Run `copy` (the canary's answer to the copied request) in the background."""
        if self.canary is None:
            copy.close()
            return
        if len(self._tasks) >= self.max_in_flight:
            copy.close()
            if self.canary.metrics is not None:
                self.canary.metrics.canary_requests.labels(served.name, served.version, "shadow", "skipped").inc()
            return
        task = asyncio.get_running_loop().create_task(self._run(served, copy))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, served: ServedModel, copy: Coroutine) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            await copy
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the copy's failure is the canary's, never the client's
            error = e
            log.info("shadow copy on %s@%s failed: %r", served.name, served.version, e)
        failed = counts_as_error(error)
        if failed is not None:
            self.canary.observe(served, "shadow", not failed, time.perf_counter() - started)

    async def close(self) -> None:
        """Cancel the copies still running (at shutdown, before the engines stop)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
