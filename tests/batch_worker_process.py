"""A batch worker in a process of its own, for tests of workers sharing one store (leases, a kill -9):
`python -m tests.batch_worker_process DB OWNER LEASE_S POLL_S LINE_S HOLD_FILE`.

Its chat answers "say X" with "OWNER: X" after LINE_S seconds, and waits first while HOLD_FILE exists,
so a test can freeze it with lines in flight. It prints "ready" once its worker runs."""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from app.batches.store import BatchStore
from app.batches.worker import BatchWorker
from app.chat.schemas import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, Usage


class SlowChat:
    def __init__(self, owner: str, line_s: float, hold: Path) -> None:
        self.owner, self.line_s, self.hold = owner, line_s, hold

    async def complete(self, req: ChatCompletionRequest, observer=None, tenant=None) -> tuple[ChatCompletion, str]:
        while self.hold.exists():
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.line_s)
        answer = Choice(0, AssistantMessage(f"{self.owner}: {req.messages[0].content}"), "stop")
        return ChatCompletion("chatcmpl-x", 0, "scripted", [answer], Usage(1, 1, 2)), "decoder:scripted"


async def main(db: str, owner: str, lease_s: str, poll_s: str, line_s: str, hold: str) -> None:
    thread = ThreadPoolExecutor(1)

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(thread, fn, *args)

    store = await off_loop(BatchStore, Path(db))
    worker = BatchWorker(store, off_loop, SlowChat(owner, float(line_s), Path(hold)), concurrency=2,
                         max_requests=1000, lease_s=float(lease_s), poll_s=float(poll_s), owner=owner)
    print("ready", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
