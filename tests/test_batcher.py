"""The micro-batching encoder (vision/batcher.py) over a real (random-weight) demo-style CNN tower."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from PIL import Image

from vision.batcher import BatcherClosed, MicroBatcher
from vision.encoders.open_clip import VisionEncoder
from vision.preprocess import PreprocessCfg
from vision.towers import ConvTower, ConvTowerCfg


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    torch.manual_seed(0)
    tower = ConvTower(ConvTowerCfg(image_size=64, channels=(16, 32, 64, 64), width=64, embed_dim=32))
    return VisionEncoder(tower, PreprocessCfg(64, (0.5,) * 3, (0.5,) * 3), "test-conv", "00")


def images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)]


class Recorder:
    """Wraps a batch encode: records batch sizes; `hold()` blocks the next forward until `release()`."""

    def __init__(self, encode) -> None:
        self.encode, self.sizes = encode, []
        self.entered, self.gate = threading.Event(), threading.Event()
        self.gate.set()

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def __call__(self, batch):
        self.sizes.append(len(batch))
        self.entered.set()
        assert self.gate.wait(10)
        return self.encode(batch)


def assert_same_features(got, want) -> None:
    torch.testing.assert_close(got.pooled, want.pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.tokens, want.tokens, rtol=1e-4, atol=1e-5)


def test_concurrent_callers_share_forwards_and_get_the_unbatched_results(encoder):
    pictures = images(16)
    expected = [encoder.encode([im])[0] for im in pictures]
    recorder = Recorder(encoder.encode)
    with MicroBatcher(recorder, max_batch=16, max_wait_ms=200) as batcher:
        results: list = [None] * 16
        start = threading.Barrier(16)

        def call(i: int) -> None:
            start.wait()
            results[i] = batcher.encode(pictures[i], timeout_s=30)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert sum(recorder.sizes) == 16 and len(recorder.sizes) < 16
    assert batcher.stats()["encoder_forwards"] == len(recorder.sizes)
    for got, want in zip(results, expected):
        assert_same_features(got, want)


def test_images_waiting_behind_a_forward_go_in_the_next_one_up_to_max_batch(encoder):
    recorder = Recorder(encoder.encode)
    with MicroBatcher(recorder, max_batch=4, max_wait_ms=0) as batcher:
        recorder.hold()
        futures = [batcher.submit(images(1, seed=0)[0])]
        assert recorder.entered.wait(10)  # the first forward runs (and is held) with one image
        futures += [batcher.submit(im) for im in images(9, seed=1)]
        recorder.release()
        for f in futures:
            f.result(30)
    assert recorder.sizes == [1, 4, 4, 1]
    assert batcher.stats()["encoder_largest_batch"] == 4 and batcher.stats()["encoder_images"] == 10


def test_a_failing_forward_fails_its_own_callers_only(encoder):
    def encode(batch):
        if any(im.size == (3, 3) for im in batch):
            raise RuntimeError("poisoned batch")
        return encoder.encode(batch)

    recorder = Recorder(encode)
    with MicroBatcher(recorder, max_batch=8, max_wait_ms=0) as batcher:
        recorder.hold()
        first = batcher.submit(images(1)[0])
        assert recorder.entered.wait(10)
        poisoned = [batcher.submit(Image.new("RGB", (3, 3))), batcher.submit(images(1, seed=5)[0])]
        recorder.release()
        assert first.result(30).tokens.shape == (16, 64)
        for f in poisoned:
            with pytest.raises(RuntimeError, match="poisoned batch"):
                f.result(30)
        after = batcher.encode(images(1, seed=6)[0], timeout_s=30)  # the worker lives on
        assert_same_features(after, encoder.encode(images(1, seed=6))[0])
        assert batcher.stats()["encoder_failed_forwards"] == 1


def test_an_encoder_returning_the_wrong_count_is_an_error_not_a_hang():
    with MicroBatcher(lambda batch: [], max_wait_ms=0) as batcher:
        with pytest.raises(RuntimeError, match="0 results for 1 images"):
            batcher.encode(images(1)[0], timeout_s=30)


def test_cancelled_requests_are_not_encoded(encoder):
    recorder = Recorder(encoder.encode)
    with MicroBatcher(recorder, max_batch=8, max_wait_ms=0) as batcher:
        recorder.hold()
        first = batcher.submit(images(1)[0])
        assert recorder.entered.wait(10)
        cancelled, kept = batcher.submit(images(1, seed=2)[0]), batcher.submit(images(1, seed=3)[0])
        assert cancelled.cancel()
        recorder.release()
        first.result(30), kept.result(30)
    assert recorder.sizes == [1, 1]


def test_close_serves_what_was_submitted_then_refuses(encoder):
    recorder = Recorder(encoder.encode)
    batcher = MicroBatcher(recorder, max_batch=2, max_wait_ms=0)
    recorder.hold()
    futures = [batcher.submit(im) for im in images(5)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    assert recorder.entered.wait(10)
    recorder.release()
    closer.join(30)
    assert all(f.result(0).tokens.shape == (16, 64) for f in futures)
    assert batcher.closed and sum(recorder.sizes) == 5
    with pytest.raises(BatcherClosed):
        batcher.submit(images(1)[0])
    batcher.close()  # idempotent


def test_asyncio_callers_are_batched_without_a_thread_each(encoder):
    pictures = images(8, seed=9)
    recorder = Recorder(encoder.encode)

    async def main(batcher):
        return await asyncio.gather(*(batcher.encode_async(im) for im in pictures))

    with MicroBatcher(recorder, max_batch=8, max_wait_ms=200) as batcher:
        results = asyncio.run(main(batcher))
    assert len(recorder.sizes) < 8
    for got, im in zip(results, pictures):
        assert_same_features(got, encoder.encode([im])[0])


def test_invalid_configuration_is_rejected(encoder):
    for kwargs in ({"max_batch": 0}, {"max_wait_ms": -1}, {"threads": -1}):
        with pytest.raises(ValueError):
            MicroBatcher(encoder.encode, **kwargs)
