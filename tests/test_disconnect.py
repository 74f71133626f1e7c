"""A client that leaves mid-stream, or hangs up on a non-streaming request, or a request that passes its
deadline, aborts its request: the engine's running count and KV-pool usage (as /metrics reports them)
return to baseline within 2 s, long before the generation would have ended on its own."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.slow_server import image_url, running_server

STEP_DELAY_S = 0.5  # this image's caption is 6 steps: 3 s if left to finish
DEADLINE_S = 2.0
# An abort lands when the step in progress ends: within one step (+ a scrape) of the client leaving,
# sooner than the deadline could have ended the request.
ABORT_WITHIN_S = STEP_DELAY_S + 0.3


def engine_gauges(base: str) -> tuple[float, float]:
    """(running requests, KV-pool usage) from one scrape, so both describe the same moment."""
    text = httpx.get(f"{base}/metrics", timeout=5).text

    def read(name: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith(name + '{model="mmserve-demo"} ')))
    return read("mmserve_running_requests"), read("mmserve_kv_cache_usage_ratio")


def wait_for_baseline(base: str, timeout_s: float = 2.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if engine_gauges(base) == (0, 0):
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not back to baseline within {timeout_s} s")


@pytest.fixture(scope="module")
def server():
    with running_server(0.0, {"MMSERVE_REQUEST_TIMEOUT_S": str(DEADLINE_S)}, step_delay_s=STEP_DELAY_S) as (base, _):
        yield base


BODY = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                                                  {"type": "text", "text": "describe the image."}]}]}


def test_leaving_a_stream_frees_the_request_at_once(server):
    assert wait_for_baseline(server) >= 0
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**BODY, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():  # leave after the first word: the deadline is still >= 1 s away
            if '"content":"' in line and '"content":""' not in line:
                break
        running, usage = engine_gauges(server)
        assert running == 1 and usage > 0
    assert wait_for_baseline(server) < ABORT_WITHIN_S


def test_hanging_up_on_a_non_streaming_request_aborts_it(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/chat/completions", json=BODY, timeout=1.0)  # leaves after ~2 steps
    assert wait_for_baseline(server) < ABORT_WITHIN_S  # the deadline would be 1 s away still
    ok = httpx.post(f"{server}/v1/chat/completions", json={**BODY, "max_tokens": 1}, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


def test_a_request_past_its_deadline_gets_504_and_is_aborted(server):
    start = time.monotonic()
    r = httpx.post(f"{server}/v1/chat/completions", json=BODY, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert DEADLINE_S <= time.monotonic() - start < DEADLINE_S + 1.5
    assert wait_for_baseline(server) < ABORT_WITHIN_S
