"""API keys, rate limits, quotas and admission control: the pieces on their own, through the real app,
and overload through a real server process on loopback."""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from litestar.testing import TestClient

from app.admission import AdmissionControl, Overloaded
from app.auth import TokenBucket, load_api_keys
from app.server import create_app
from app.settings import Settings
from app.tenancy.keys import Keys
from app.tenancy.principal import Limits, Principal
from app.tenancy.quotas import QuotaStore
from tests.slow_server import image_url, running_server

KEYS = "key-one,key-two,key-three"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- keys ----------------------------------------------------------------------------------------------
def test_keys_come_from_the_list_and_the_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# ops keys\nfile-key\n\n  spaced-key  \n")
    assert load_api_keys(Settings(api_keys=" a, ,b", api_key_file=str(path))) == {"a", "b", "file-key", "spaced-key"}
    assert load_api_keys(Settings()) == frozenset()
    with pytest.raises(ValueError, match="nope"):
        load_api_keys(Settings(api_key_file=str(tmp_path / "nope")))


def test_a_key_is_compared_with_every_configured_key(monkeypatch):
    calls, real = [], hmac.compare_digest

    def counting(a, b):
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr("app.tenancy.keys.hmac.compare_digest", counting)
    access = Keys(frozenset({"k1", "k2", "k3"}), None, Limits())
    assert access.identify("Bearer k1").key_id.startswith("env_")  # a match does not stop the scan
    assert len(calls) == 3
    assert access.identify("Bearer k4") is None and access.identify("Basic k1") is None
    assert access.identify(None) is None and access.identify("Bearer ") is None


@pytest.fixture(scope="module")
def guarded(demo_runtime, tmp_path_factory):
    settings = Settings(api_keys=KEYS, rate_limit_rpm=60, rate_limit_burst=3, quota_tokens_per_day=15,
                        data_dir=tmp_path_factory.mktemp("guarded"))
    with TestClient(create_app(settings, demo_runtime)) as c:
        yield c


def test_v1_needs_a_key_and_probes_do_not(guarded):
    for path in ("/health", "/metrics", "/schema/openapi.json"):
        assert guarded.get(path).status_code == 200, path
    assert guarded.get("/ready").status_code != 401  # 200 or 503 (warm-up may still run), never refused
    missing = guarded.get("/v1/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "invalid_api_key" and "Authorization" in missing.json()["error"]["message"]
    wrong = guarded.get("/v1/models", headers=bearer("key-four"))
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    assert guarded.get("/v1/models", headers={"Authorization": "Basic key-one"}).status_code == 401
    assert guarded.post("/v1/embeddings", json={"input": "a red circle"}).status_code == 401


def test_burst_above_the_rate_limit_gets_429_with_retry_after(guarded):
    codes = [guarded.get("/v1/models", headers=bearer("key-two")) for _ in range(5)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    limited = codes[3]
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert guarded.get("/v1/models", headers=bearer("key-one")).status_code == 200  # buckets are per key


def test_quota_is_charged_by_embeddings_and_enforced(guarded, demo_runtime):
    text, quota = "a red circle", 15
    per_request = len(demo_runtime.tokenizer.encode(text)) + 2  # with the start and end tokens
    used = 0
    while used < quota:  # a request that starts under the quota is answered
        r = guarded.post("/v1/embeddings", json={"input": text}, headers=bearer("key-three"))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] == per_request
        used += per_request
    over = guarded.post("/v1/embeddings", json={"input": text}, headers=bearer("key-three"))
    assert over.status_code == 429 and over.json()["error"]["type"] == "insufficient_quota"
    assert 0 < int(over.headers["retry-after"]) <= 86_400


def test_no_keys_no_guard(demo_runtime, tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path), demo_runtime)) as c:
        assert c.get("/v1/models").status_code == 200


# -- the bookkeeping on its own ----------------------------------------------------------------------------
def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(capacity=2, per_second=0.5, tokens=2, updated=0.0)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(2.0)  # one token every 2 s
    assert bucket.take(1.0) == pytest.approx(1.0)
    assert bucket.take(2.0) == 0
    assert bucket.take(100.0) == 0 and bucket.take(100.0) == 0 and bucket.take(100.0) > 0  # capped at 2


def test_quota_resets_with_the_utc_day(tmp_path):
    now = {"t": 3 * 86_400 + 86_000.0}  # 400 s before midnight UTC
    quotas = QuotaStore(tmp_path / "usage.sqlite3", clock=lambda: now["t"])
    key = Principal("key_k", "t", limits=Limits(tokens_per_day=100))
    assert quotas.admit(key) is None
    quotas.charge(key, tokens=60)
    assert quotas.admit(key) is None
    quotas.charge(key, tokens=60)
    refusal = quotas.admit(key)
    assert refusal.status == 429 and refusal.code == "insufficient_quota" and refusal.retry_after_s == 400
    now["t"] += 400
    assert quotas.usage("key_k")["day"].tokens == 0 and quotas.admit(key) is None
    quotas.charge(Principal("", ""), tokens=10**9)  # an open server: nothing to charge


def test_admission_queues_in_order_and_refuses_past_both_limits():
    async def scenario():
        gate = AdmissionControl(max_active=2, max_waiting=1)
        await gate.acquire()
        await gate.acquire()
        queued = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        assert (gate.active, gate.waiting) == (2, 1) and not queued.done()
        with pytest.raises(Overloaded):
            await gate.acquire()
        gate.release()  # the slot passes to the queued request
        await queued
        assert (gate.active, gate.waiting) == (2, 0)
        gate.release()
        gate.release()
        assert gate.active == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_back_its_place_and_its_slot():
    async def scenario():
        gate = AdmissionControl(max_active=1, max_waiting=2)
        await gate.acquire()
        first, second = asyncio.ensure_future(gate.acquire()), asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        assert gate.waiting == 1
        gate.release()  # goes to `second`, not to the cancelled one
        await second
        third = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        gate.release()  # handed to `third`...
        third.cancel()  # ...which is cancelled before it runs: the slot must not leak
        with pytest.raises(asyncio.CancelledError):
            await third
        assert (gate.active, gate.waiting) == (0, 0)

    asyncio.run(scenario())


# -- overload through a real server process ---------------------------------------------------------------
def test_overload_only_the_excess_gets_429_and_every_accepted_request_completes():
    limit, queue, delay = 2, 1, 1.0
    n = 2 * (limit + queue)
    env = {"MMSERVE_MAX_CONCURRENT_REQUESTS": str(limit), "MMSERVE_MAX_QUEUED_REQUESTS": str(queue)}
    with running_server(delay, env) as (base, _), httpx.Client(limits=httpx.Limits(max_connections=n)) as client:
        body = {"input": [image_url()]}
        start_together = threading.Barrier(n)

        def one(_):
            start_together.wait()
            r = client.post(f"{base}/v1/embeddings", json=body, timeout=30)
            return r, time.monotonic()

        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one, range(n)))
        accepted = [(r, done) for r, done in results if r.status_code == 200]
        refused = [(r, done) for r, done in results if r.status_code == 429]
        assert len(accepted) == limit + queue and len(refused) == n - limit - queue, [r.status_code for r, _ in results]
        for r, _ in accepted:
            assert len(r.json()["data"][0]["embedding"]) == 64
        first_answer = min(done for _, done in accepted)
        for r, done in refused:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_overloaded"
            assert done < first_answer  # refused at once, not after waiting for a slot
        metrics = client.get(f"{base}/metrics").text
        assert f'mmserve_rejected_requests_total{{model="",reason="overloaded"}} {float(n - limit - queue)}' in metrics
        assert 'mmserve_admission_active{model=""} 0.0' in metrics
        assert 'mmserve_admission_queue_depth{model=""} 0.0' in metrics
