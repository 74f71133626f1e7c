"""/metrics through the real app: the text parses, the counters move with requests, each app has its
own registry; and the hooks the engine and the chat path call."""

from __future__ import annotations

import time

import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import GenerationTimer, Metrics
from app.server import create_app
from app.settings import Settings
from tests.conftest import data_url
from tests.independent_world import Obj, Scene, render

URL = data_url(render(Scene("white", [Obj("circle", "red", "large", 64.0, 64.0, 50)])))


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the exposition text, keyed by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def client(demo_runtime):
    with TestClient(create_app(Settings(), demo_runtime)) as c:
        wait_ready(c)  # the warm-up's own token must not land in a test's count
        yield c


def wait_ready(client, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").json()
        time.sleep(0.05)


def test_metrics_text_parses_and_names_every_family(client):
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"mmserve_request_duration_seconds", "mmserve_requests", "mmserve_request_failures",
            "mmserve_requests_in_flight", "mmserve_admission_active", "mmserve_admission_queue_depth",
            "mmserve_rejected_requests", "mmserve_time_to_first_token_seconds", "mmserve_inter_token_latency_seconds",
            "mmserve_generated_tokens", "mmserve_running_requests", "mmserve_waiting_requests",
            "mmserve_kv_cache_usage_ratio", "mmserve_feature_cache_hits", "mmserve_feature_cache_misses",
            "mmserve_router_decisions", "mmserve_oom_events"} <= names


def test_a_request_moves_the_counters_and_the_latency_histogram(client):
    before = client.get("/metrics").text
    assert client.get("/v1/models").status_code == 200
    after = client.get("/metrics").text
    for name in ("mmserve_requests_total", "mmserve_request_duration_seconds_count"):
        labels = {"route": "/v1/models", "status": "200", "model": ""} | ({"method": "GET"} if "duration" in name else {})
        assert value(after, name, **labels) == value(before, name, **labels) + 1, name
    assert value(after, "mmserve_requests_in_flight", model="") == 1.0  # the scrape itself


def test_failures_are_counted_by_their_openai_type_and_code(client):
    before = client.get("/metrics").text
    errors = [client.post("/v1/embeddings", json={"model": "gpt-9", "input": "x"}),
              client.post("/v1/embeddings", json={"input": "data:image/png;base64,AAAA"})]
    assert [r.status_code for r in errors] == [404, 400]
    after = client.get("/metrics").text
    for r, model in zip(errors, ["", "mmserve-demo"]):  # an unknown model mints no label of its own
        labels = {"type": r.json()["error"]["type"], "code": r.json()["error"]["code"], "model": model}
        assert value(after, "mmserve_request_failures_total", **labels) == \
            value(before, "mmserve_request_failures_total", **labels) + 1, labels


def test_a_chat_completion_moves_the_engine_metrics(client):
    before = client.get("/metrics").text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": URL}}, {"type": "text", "text": "describe the image."}]}]})
    assert r.status_code == 200, r.text
    after = client.get("/metrics").text
    m = {"model": "mmserve-demo"}
    generated = value(after, "mmserve_generated_tokens_total", **m) - value(before, "mmserve_generated_tokens_total", **m)
    assert generated == r.json()["usage"]["completion_tokens"]
    assert value(after, "mmserve_running_requests", **m) == 0.0 and value(after, "mmserve_waiting_requests", **m) == 0.0
    assert 0.0 <= value(after, "mmserve_kv_cache_usage_ratio", **m) <= 1.0
    route = {"route": "/v1/chat/completions", "status": "200", **m}
    assert value(after, "mmserve_requests_total", **route) == value(before, "mmserve_requests_total", **route) + 1
    assert value(after, "mmserve_time_to_first_token_seconds_count", **m) == \
        value(before, "mmserve_time_to_first_token_seconds_count", **m) + 1


def test_each_app_has_its_own_registry(demo_runtime):
    with TestClient(create_app(Settings(), demo_runtime)) as one, TestClient(create_app(Settings(), demo_runtime)) as two:
        one.get("/v1/models")
        one.get("/v1/models")
        two.get("/v1/models")
        labels = {"route": "/v1/models", "status": "200", "model": ""}
        assert value(one.get("/metrics").text, "mmserve_requests_total", **labels) == 2
        assert value(two.get("/metrics").text, "mmserve_requests_total", **labels) == 1


# -- the hooks for the engine and the chat path ------------------------------------------------------------
def test_generation_timer_observes_ttft_once_and_a_gap_per_later_token():
    metrics, now = Metrics(), {"t": 10.0}
    timer = GenerationTimer(metrics, "m", clock=lambda: now["t"])
    now["t"] = 10.25
    timer.tokens(1)  # first token after 0.25 s
    now["t"] = 10.45
    timer.tokens(2)  # two tokens in one delivery 0.2 s later: 0.1 s each
    now["t"] = 10.5
    timer.tokens(0)
    text = metrics.render().decode()
    assert value(text, "mmserve_time_to_first_token_seconds_count", model="m") == 1
    assert value(text, "mmserve_time_to_first_token_seconds_sum", model="m") == pytest.approx(0.25)
    assert value(text, "mmserve_inter_token_latency_seconds_count", model="m") == 2
    assert value(text, "mmserve_inter_token_latency_seconds_sum", model="m") == pytest.approx(0.2)


def test_cache_router_oom_and_stream_failure_records():
    metrics = Metrics()
    metrics.record_feature_cache("a", "hot", hit=True)
    metrics.record_feature_cache("a", "hot", hit=True)
    metrics.record_feature_cache("b", "disk", hit=False)
    metrics.record_route("a", "stage1")
    metrics.record_oom("b")
    metrics.record_failure("timeout_error", "timeout", "a")
    text = metrics.render().decode()
    assert value(text, "mmserve_feature_cache_hits_total", tier="hot", model="a") == 2
    assert value(text, "mmserve_feature_cache_misses_total", tier="disk", model="b") == 1
    assert value(text, "mmserve_router_decisions_total", route="stage1", model="a") == 1
    assert value(text, "mmserve_oom_events_total", model="b") == 1
    assert value(text, "mmserve_request_failures_total", type="timeout_error", code="timeout", model="a") == 1


def test_engine_gauges_read_at_scrape_time_and_survive_a_torn_read():
    metrics = Metrics()
    stats = {"running": 3, "waiting": 1, "kv_usage": 0.5}
    broken = {"now": False}

    def read():
        if broken["now"]:
            raise RuntimeError("dictionary changed size during iteration")
        return stats

    metrics.bind_engine("m", read)
    assert value(metrics.render().decode(), "mmserve_running_requests", model="m") == 3
    stats.update(running=0, kv_usage=0.0)
    text = metrics.render().decode()
    assert value(text, "mmserve_running_requests", model="m") == 0
    assert value(text, "mmserve_kv_cache_usage_ratio", model="m") == 0
    broken["now"] = True
    assert value(metrics.render().decode(), "mmserve_waiting_requests", model="m") == 1  # the last good value
    metrics.observe_engine_step("m", [object()] * 4)
    assert value(metrics.render().decode(), "mmserve_generated_tokens_total", model="m") == 4
