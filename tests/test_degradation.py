"""Degradation under overload, in order, through the real app in-process: with one slot and a queue of
four, a request that waits behind one other gets fewer visual tokens, behind two the small model too,
and past the queue a 429; each step named in x-mmserve-degraded and counted. The policy labels still
refuse a degraded request's image."""

from __future__ import annotations

import json
import threading
import time

import pytest
from litestar.testing import TestClient

from app.degrade import degrade_level
from app.models.entry import ModelEntry
from app.models.families.coca import CoCaModel
from llm.hardware import resolve_dtype
from app.server import create_app
from app.settings import BUNDLED_MODEL, Settings
from tests.conftest import data_url
from tests.independent_world import Obj, Scene, render
from tests.slow_server import image_url, slowed

ENCODE_S = 0.6  # the large model's encoder is this much slower per call: requests stay in line


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def client(demo_runtime, data_dir):
    settings = Settings(router_enabled=False, router_small_model="small", router_large_model="big",
                        data_dir=data_dir, audit_log=str(data_dir / "audit.jsonl"),
                        router_policy_labels="a green triangle", max_concurrent_requests=1, max_queued_requests=4,
                        degrade_visual_tokens_waiting=1, degrade_small_model_waiting=2, degrade_visual_tokens="0.25")
    big = slowed(CoCaModel.from_dir(BUNDLED_MODEL, resolve_dtype("auto")), ENCODE_S, 0.0)  # the served dtype
    models = [(ModelEntry("big", BUNDLED_MODEL), big),
              (ModelEntry("small", BUNDLED_MODEL), demo_runtime)]
    with TestClient(create_app(settings, models)) as c:
        yield c


def gauge(client, name: str) -> float:
    line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith(name + '{model=""} '))
    return float(line.split()[-1])


def test_the_levels_come_in_order():
    settings = Settings(degrade_visual_tokens_waiting=2, degrade_small_model_waiting=5)
    assert [degrade_level(settings, n) for n in (0, 1, 2, 4, 5, 9)] == [0, 0, 1, 1, 2, 2]
    assert degrade_level(Settings(degrade_visual_tokens_waiting=0, degrade_small_model_waiting=0), 99) == 0
    with pytest.raises(ValueError, match="fewer visual tokens first"):
        Settings(degrade_visual_tokens_waiting=9, degrade_small_model_waiting=3)


def test_fewer_visual_tokens_then_the_small_model_then_429(client, data_dir):
    triangle = data_url(render(Scene("black", [Obj("triangle", "green", "large", 60.0, 70.0, 50)])))
    images = [image_url((40 * i, 90, 200 - 30 * i)) for i in range(4)] + [triangle, image_url((9, 9, 9))]
    results: dict[int, object] = {}

    def send(i: int) -> None:
        results[i] = client.post("/v1/chat/completions", json={
            "model": "big", "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": images[i]}},
                {"type": "text", "text": "what color is it?"}]}]})

    threads = []
    for i, (name, value) in enumerate([("mmserve_admission_active", 1)] + [("mmserve_admission_queue_depth", n)
                                                                           for n in (1, 2, 3, 4)]):
        threads.append(threading.Thread(target=send, args=(i,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while gauge(client, name) < value:  # each is in line before the next arrives
            assert time.monotonic() < deadline, f"request {i} never got in line"
            time.sleep(0.01)
    send(5)  # the queue is full
    for t in threads:
        t.join(30)
    refused = results[5]
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "server_overloaded"
    assert all(results[i].status_code == 200 for i in range(5)), [results[i].text for i in range(5)]
    degraded = [results[i].headers.get("x-mmserve-degraded") for i in range(5)]
    assert degraded == [None, None, "visual_tokens=0.25", "model=small, visual_tokens=0.25", "model=small"]
    assert [results[i].json()["model"] for i in range(5)] == ["big", "big", "big", "small", "small"]
    policy = results[4]  # degraded to the small model, and its image still meets the policy labels
    assert policy.headers["x-mmserve-route"] == "policy"
    metrics = client.get("/metrics").text
    for series, count in (('step="visual_tokens"} ', 2), ('step="small_model"} ', 2)):
        assert sum(float(x.split()[-1]) for x in metrics.splitlines()
                   if x.startswith("mmserve_degraded_requests_total") and series in x) == count
    assert 'mmserve_degraded_requests_total{model="small",step="visual_tokens"} 1.0' in metrics
    audit = [json.loads(line) for line in (data_dir / "audit.jsonl").read_text().splitlines()]
    reasons = [(r["router_route"], r["router_reason"]) for r in audit if r.get("route") == "/v1/chat/completions"]
    # the audit names the policy refusal and the degradation steps of each request
    assert any(route == "policy" and why.startswith("policy label 'a green triangle'") and
               why.endswith("degraded: model=small") for route, why in reasons)
    assert any(why.endswith("degraded: model=small, visual_tokens=0.25") for _, why in reasons)
