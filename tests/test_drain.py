"""Readiness and the SIGTERM drain: warm-up turns /ready green, draining turns it red again, and a real
server process on loopback finishes a request in flight after SIGTERM, then exits cleanly."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from litestar.testing import TestClient

from app.lifecycle import Readiness, warm_up
from app.server import create_app
from app.settings import Settings
from tests.slow_server import image_url, running_server


class _Stub:
    """A chat service over two models: one that sees images and one that reads text only."""

    # warm-up names each version (NAME@VERSION): canaries are warmed too, with no split
    registry = SimpleNamespace(versions=lambda: [
        SimpleNamespace(name="seeing", version="v1", capabilities=SimpleNamespace(max_images=1)),
        SimpleNamespace(name="reading", version="v1", capabilities=SimpleNamespace(max_images=0))])

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls = fail, 0

    async def complete(self, request):
        self.calls += 1
        content = request.messages[0].content
        if request.model == "seeing@v1":
            assert content[0].image_url.url.startswith("data:image/png")
        else:
            assert request.model == "reading@v1" and isinstance(content, str)
        assert request.max_tokens == 1
        if self.fail:
            raise RuntimeError("no memory for the KV pool")

    async def warm_up(self):
        self.calls += 1


def test_warm_up_turns_readiness_green_only_when_it_went_through():
    readiness, chat, embeddings = Readiness(), _Stub(), _Stub()
    assert (readiness.ready, readiness.status) == (False, "warming_up")
    asyncio.run(warm_up(readiness, chat, embeddings))
    assert (readiness.ready, readiness.status, chat.calls, embeddings.calls) == (True, "ready", 2, 1)
    readiness.start_draining()
    assert (readiness.ready, readiness.status) == (False, "draining")

    failed = Readiness()
    asyncio.run(warm_up(failed, _Stub(fail=True), _Stub()))
    assert (failed.ready, failed.status) == (False, "failed") and "no memory" in failed.failure


def test_ready_endpoint_follows_warm_up_and_drain(demo_runtime):
    app = create_app(Settings(), demo_runtime)
    with TestClient(app) as client:
        deadline = time.monotonic() + 30
        while (r := client.get("/ready")).status_code != 200:
            assert r.status_code == 503 and r.json()["status"] == "warming_up"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert r.json() == {"status": "ready"}
        app.state.readiness.start_draining()
        r = client.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        assert client.get("/health").status_code == 200  # alive while draining


def _in_flight(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith('mmserve_admission_active{model=""} '):
            return float(line.split()[1])
    raise AssertionError("mmserve_admission_active missing from /metrics")


def test_sigterm_drains_a_real_server():
    delay = 2.0
    with running_server(delay, {"MMSERVE_DRAIN_TIMEOUT_S": "20"}) as (base, proc):
        result: dict = {}

        def slow_request():
            start = time.monotonic()
            result["response"] = httpx.post(f"{base}/v1/embeddings", json={"input": [image_url()]}, timeout=30)
            result["done_at"] = time.monotonic()
            result["took"] = result["done_at"] - start

        worker = threading.Thread(target=slow_request)
        worker.start()
        deadline = time.monotonic() + 10
        while _in_flight(base) < 1:  # the request holds its slot: it is in flight now
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()

        ready_during_drain = None
        while ready_during_drain is None and time.monotonic() < signalled_at + 5:
            r = httpx.get(f"{base}/ready", timeout=5)
            if r.status_code == 503:
                ready_during_drain = r
            time.sleep(0.02)
        assert ready_during_drain is not None and ready_during_drain.json() == {"status": "draining"}
        assert "response" not in result  # readiness failed first, while the request was still running

        worker.join(timeout=30)
        response = result["response"]
        assert response.status_code == 200, response.text
        assert len(response.json()["data"][0]["embedding"]) == 64
        assert proc.wait(timeout=20) == 0  # a clean exit once nothing is in flight
        assert time.monotonic() - result["done_at"] < 10  # well inside the 20 s drain timeout
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=2)
