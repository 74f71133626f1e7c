"""The engine loop in its own thread, and the asyncio face the server talks to.

    async for out in engine.generate(request_id, prompt_ids, image, params): ...
    engine.abort(request_id)

Requests and aborts cross into the loop thread through a queue; outputs come back to each caller's
event loop with `call_soon_threadsafe`. Leaving the `async for` early (client gone, deadline passed,
task cancelled) aborts the request, which frees its KV blocks at the loop's next turn.

A failed step (out of memory, a bug) fails the requests that were in it with the error and leaves the
engine serving the rest: one bad batch must not take the server down. A request that fails alone (its
grammar did not compile, or cannot go on) gets its own error raised from its `async for`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llm.engine import Engine, ImageInput, RequestOutput
from llm.params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down, or crashed)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            pass


class AsyncEngine:
    def __init__(self, engine: Engine, on_step: Callable[[Engine, list[RequestOutput]], None] | None = None,
                 on_error: Callable[[Exception], None] | None = None) -> None:
        self.engine = engine
        self._on_step = on_step  # metrics hooks, called in the loop thread after each step / failed step
        self._on_error = on_error
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._running = False
        self._thread: threading.Thread | None = None
        self.step_failures = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="mmserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.engine.grammars is not None:
            self.engine.grammars.close()

    @property
    def grammars(self):
        """The engine's GrammarCompiler (thread-safe; None when the model declares no vocabulary)."""
        return self.engine.grammars

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the asyncio side --------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], image: ImageInput,
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._commands.put(("add", request_id, prompt_ids, image, params, stream))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # -- the loop thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while self._running:
            self._apply_commands()
            if not self.engine.has_unfinished:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                self.step_failures += 1
                log.exception("engine step failed; failing its requests")
                if self._on_error is not None:
                    self._on_error(e)
                self._fail_all(e)
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out if out.error is None else out.error)
                    if out.finished:
                        del self._streams[out.request_id]
            if self._on_step is not None:
                self._on_step(self.engine, outputs)
        self._fail_all(EngineDeadError("the engine shut down"))

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt_ids, image, params, stream = command
                try:
                    self.engine.add_request(request_id, prompt_ids, image, params)
                except Exception as e:  # noqa: BLE001 - e.g. PromptRejected: goes back to its caller
                    stream.put(e)
                    continue
                self._streams[request_id] = stream
            else:
                _, request_id = command
                self.engine.abort(request_id)
                self._streams.pop(request_id, None)

    def _fail_all(self, error: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(error)
        self._streams.clear()
