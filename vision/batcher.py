"""Micro-batching in front of the vision encoder: many callers, one forward.

Each request encodes one image, but a forward over 16 images costs far less than 16 forwards (the
weights are read once, the matmuls are larger). Callers in any thread submit one image and get a
future; one worker thread takes the first waiting image, then gathers more until it has `max_batch`
or `max_wait_ms` have passed since that first one, and runs one forward under
`torch.inference_mode` for all of them (vLLM and TGI batch the same way, in the scheduler).

- A lone request pays at most `max_wait_ms` extra; under load the wait is cut short by a full batch.
- A forward that raises fails the futures of that batch only; the worker serves the next batch.
- A caller that cancelled its future before the batch was formed is skipped.
- One forward at a time: the encoder is never entered from two threads, and torch's intra-op threads
  (`threads`, the server's `MMSERVE_THREADS`) parallelise inside each forward.
- `close()` stops accepting, lets the worker finish what was already submitted, and joins it.

asyncio callers use `encode_async`, which awaits the future without holding a thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch
from PIL import Image

from vision.encoders.base import ImageFeatures

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[Image.Image]], list[ImageFeatures]]
_STOP = object()  # queued by close(): everything submitted before it is still served


class BatcherClosed(RuntimeError):
    """The batcher was closed; no more images are accepted."""


class MicroBatcher:
    """`encode` is a batch function, e.g. `VisionEncoder.encode`: it sees lists of 1..max_batch images."""

    def __init__(self, encode: EncodeFn, max_batch: int = 16, max_wait_ms: float = 5.0, threads: int = 0,
                 name: str = "vision-encoder") -> None:
        if max_batch < 1 or max_wait_ms < 0 or threads < 0:
            raise ValueError(f"need max_batch >= 1, max_wait_ms >= 0, threads >= 0; "
                             f"got {max_batch}, {max_wait_ms}, {threads}")
        self._encode = encode
        self.max_batch, self.max_wait_s, self.threads = max_batch, max_wait_ms / 1000.0, threads
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = threading.Event()
        self._submit_lock = threading.Lock()  # orders submits against close's stop marker
        self._stats_lock = threading.Lock()
        self._forwards = self._images = self._failed_forwards = 0
        self._encode_seconds = 0.0
        self._largest_batch = 0
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    # -- callers -------------------------------------------------------------------------------------
    def submit(self, image: Image.Image) -> Future[ImageFeatures]:
        future: Future[ImageFeatures] = Future()
        with self._submit_lock:
            if self._closing.is_set():
                raise BatcherClosed("the vision encoder is shutting down")
            self._queue.put((image, future))
        return future

    def encode(self, image: Image.Image, timeout_s: float | None = None) -> ImageFeatures:
        """Blocking: the features of one image, encoded together with whatever else is waiting."""
        return self.submit(image).result(timeout_s)

    async def encode_async(self, image: Image.Image) -> ImageFeatures:
        return await asyncio.wrap_future(self.submit(image))

    # -- the worker ----------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True  # serve this batch, then stop: nothing can be queued after the marker
                    break
                batch.append(item)
            self._forward(batch)

    def _forward(self, batch: list[tuple[Image.Image, Future]]) -> None:
        live = [(image, future) for image, future in batch if future.set_running_or_notify_cancel()]
        if not live:
            return
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                features = self._encode([image for image, _ in live])
            if len(features) != len(live):
                raise RuntimeError(f"the encoder returned {len(features)} results for {len(live)} images")
        except BaseException as error:  # noqa: BLE001 - the callers get it; the worker must live on
            self._count(len(live), time.perf_counter() - start, failed=True)
            log.warning("vision encoder: a forward over %d images failed: %r", len(live), error)
            for _, future in live:
                future.set_exception(error)
            return
        self._count(len(live), time.perf_counter() - start, failed=False)
        for (_, future), result in zip(live, features):
            future.set_result(result)

    def _count(self, images: int, seconds: float, failed: bool) -> None:
        with self._stats_lock:
            self._forwards += 1
            self._failed_forwards += failed
            self._images += 0 if failed else images
            self._encode_seconds += seconds
            self._largest_batch = max(self._largest_batch, images)

    # -- housekeeping --------------------------------------------------------------------------------
    def stats(self) -> dict[str, int | float]:
        with self._stats_lock:
            return {"encoder_forwards": self._forwards, "encoder_images": self._images,
                    "encoder_failed_forwards": self._failed_forwards, "encoder_seconds": self._encode_seconds,
                    "encoder_largest_batch": self._largest_batch, "encoder_queued": self._queue.qsize()}

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new images, serve those already submitted, stop the worker. Idempotent."""
        with self._submit_lock:
            if not self._closing.is_set():
                self._closing.set()
                self._queue.put(_STOP)
        self._worker.join(timeout_s)

    @property
    def closed(self) -> bool:
        return self._closing.is_set() and not self._worker.is_alive()

    def __enter__(self) -> MicroBatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
