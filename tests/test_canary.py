"""Two versions of the demo model under one name, through the real app in-process: the canary split
within bounds over a few hundred requests and sticky (per end user, per conversation across turns),
shadow copies the client never sees, an admin rollback that takes effect at once while a request in
flight finishes on the version it started on, and automatic rollback of a faulty canary (one whose
decoder raises, one that is slow) — tests/faulty.py injects the fault, nothing in app/ knows of it."""

from __future__ import annotations

import json
import threading
import time

import pytest
from litestar.testing import TestClient

from app.canary.policy import CanaryPolicy, parse_canary_flag
from app.canary.split import point, sticky_key
from app.canary.window import Margins, OutcomeWindow, verdict
from app.chat.conversation import parse_messages
from app.chat.schemas import ChatMessage
from app.models.entry import ModelEntry, ModelEntryError, parse_model_flag
from app.server import create_app
from app.settings import BUNDLED_MODEL, Settings
from app.tenancy.audit import verify as verify_chain
from app.tenancy.keys import KeyStore
from tests.conftest import data_url
from tests.faulty import Fault, faulty_demo
from tests.independent_world import Obj, Scene, render

URL = data_url(render(Scene("white", [Obj("circle", "red", "large", 64.0, 64.0, 50)])))
SPLIT_N = 200
MIN_SAMPLES = 5
SLOW_S = 0.8  # a slow canary's extra time per decoder forward


def body(user=None, text="what color is the object?", max_tokens=1, turns=(), **extra):
    first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL}},
                                         {"type": "text", "text": text}]}
    return {"model": "demo", "messages": [first, *turns], "max_tokens": max_tokens,
            **({"user": user} if user else {}), **extra}


@pytest.fixture(scope="module")
def fault():
    return Fault()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def audit_path(data_dir):
    return data_dir / "audit.jsonl"


@pytest.fixture(scope="module")
def client(demo_runtime, fault, data_dir, audit_path):
    settings = Settings(router_enabled=False, data_dir=data_dir, audit_log=str(audit_path),
                        canary=("demo@v2=0.3",), canary_min_samples=MIN_SAMPLES,
                        canary_window_s=600, canary_max_p95_ratio=3.0, canary_p95_slack_s=0.2,
                        canary_shadow_max_in_flight=64)
    models = [(ModelEntry("demo", BUNDLED_MODEL, version="v1"), demo_runtime),
              (ModelEntry("demo", BUNDLED_MODEL, version="v2"), faulty_demo(fault))]
    with TestClient(create_app(settings, models)) as c:
        yield c


def chat(client, payload):
    r = client.post("/v1/chat/completions", json=payload)
    return r, r.headers.get("x-mmserve-model-version")


def set_canary(client, **change):
    r = client.put("/v1/admin/models/demo/canary", json=change)
    assert r.status_code == 200, r.text
    return r.json()


def metric(client, line_start: str) -> float:
    text = client.get("/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


# -- the pieces on their own --------------------------------------------------------------------------
def test_flags_policies_and_the_verdict():
    assert parse_model_flag("demo@v2=/m") == ModelEntry("demo", "/m", version="v2")
    assert parse_canary_flag("demo@v2=shadow:0.5") == CanaryPolicy("demo", "v2", 0.5, "shadow")
    assert parse_canary_flag("demo=0.1") == CanaryPolicy("demo", "", 0.1, "split")
    for bad in ("demo@v2", "demo@v2=lots", "=0.1"):
        with pytest.raises(ModelEntryError, match="expected NAME@VERSION=WEIGHT"):
            parse_canary_flag(bad)
    with pytest.raises(ModelEntryError, match=r"weight must be a number in \[0, 1\]"):
        parse_canary_flag("demo@v2=1.5")
    with pytest.raises(ModelEntryError, match="not a valid label"):
        ModelEntry("demo", "/m", version="v 2")
    margins = Margins(min_samples=4, max_error_rate_delta=0.05, max_p95_ratio=1.5, p95_slack_s=0.0)
    stable, canary = OutcomeWindow(60, 100), OutcomeWindow(60, 100)
    for i in range(10):
        stable.add(i, True, 0.1)
    for i in range(3):
        canary.add(i, False, 0.0)
    assert verdict(canary.stats(10), stable.stats(10), margins) is None  # 3 < min_samples
    canary.add(3, False, 0.0)
    assert "error rate 100.0%" in verdict(canary.stats(10), stable.stats(10), margins)
    assert canary.stats(100).samples == 0  # out of the window
    for i in range(4):
        canary.add(100 + i, True, 0.2)
        stable.add(100 + i, True, 0.1)
    assert "p95 latency 0.200 s" in verdict(canary.stats(104), stable.stats(104), margins)


def test_the_sticky_key_follows_the_user_the_key_and_the_conversation():
    first = ChatMessage("user", "hello")
    one = parse_messages([first])
    later = parse_messages([first, ChatMessage("assistant", "hi"), ChatMessage("user", "more")])
    other = parse_messages([ChatMessage("user", "bye")])
    key = sticky_key(one, None, "tenant-a", "conversation")
    assert sticky_key(later, None, "tenant-a", "conversation") == key  # later turns: the same conversation
    assert sticky_key(other, None, "tenant-a", "conversation") != key
    assert sticky_key(one, None, "tenant-b", "conversation") != key  # another key's conversation
    assert sticky_key(other, None, "tenant-a", "key") == sticky_key(one, None, "tenant-a", "key")
    assert sticky_key(other, "alice", "tenant-a", "conversation") == sticky_key(one, "alice", None, "key")
    points = [point("demo", f"u{i}") for i in range(2000)]
    assert abs(sum(p < 0.3 for p in points) / 2000 - 0.3) < 0.04 and point("demo", "u1") == points[1]


# -- through the app ------------------------------------------------------------------------------------
def test_both_versions_are_served_and_each_answers_to_name_at_version(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["demo"]  # one public name
    assert client.get("/v1/models/demo@v2").json()["version"] == "v2"
    for version in ("v1", "v2"):
        r, answered = chat(client, body(model=f"demo@{version}"))
        assert r.status_code == 200 and answered == version and r.json()["model"] == "demo"
    status = client.get("/v1/admin/models/demo/canary").json()
    assert (status["stable"], status["canary"], status["weight"], status["mode"], status["state"]) == \
        ("v1", "v2", 0.3, "split", "active")
    assert metric(client, 'mmserve_canary_weight{model="demo"}') == 0.3
    assert metric(client, 'mmserve_running_requests{model="demo@v2"}') == 0  # each engine its own series


def test_the_split_is_within_bounds_and_sticky(client):
    set_canary(client, weight=0.3, mode="split")
    before = metric(client, 'mmserve_canary_requests_total{model="demo",outcome="ok",role="canary",version="v2"}')
    versions = {}
    for i in range(SPLIT_N):
        r, versions[i] = chat(client, body(user=f"user-{i}"))
        assert r.status_code == 200
    share = sum(v == "v2" for v in versions.values()) / SPLIT_N
    assert 0.2 <= share <= 0.4, share  # 0.3 +- 3 sigma of 200 draws
    after = metric(client, 'mmserve_canary_requests_total{model="demo",outcome="ok",role="canary",version="v2"}')
    assert after - before == sum(v == "v2" for v in versions.values())
    for i in range(0, SPLIT_N, 15):  # the same end user, the same version
        assert chat(client, body(user=f"user-{i}"))[1] == versions[i]
    set_canary(client, weight=0.6)  # more canary: who had it keeps it
    for i in range(0, SPLIT_N, 15):
        if versions[i] == "v2":
            assert chat(client, body(user=f"user-{i}"))[1] == "v2"


def test_a_conversation_keeps_its_version_across_turns(client):
    set_canary(client, weight=0.5, mode="split")
    seen = {}
    for i in range(12):
        text = "how many objects are there?" if i % 2 else "what color is the object?"
        opening = body(text=text, seed=i)
        first = chat(client, opening)[1]
        turns = [{"role": "assistant", "content": "red"}, {"role": "user", "content": "and the shape?"}]
        assert chat(client, body(text=text, turns=turns))[1] == first
        seen[text] = first
    assert len(seen) == 2


def test_shadow_mode_answers_with_stable_and_copies_to_the_canary(client):
    set_canary(client, weight=1.0, mode="shadow")
    label = 'mmserve_canary_requests_total{model="demo",outcome="ok",role="shadow",version="v2"}'
    before = metric(client, label)
    answers = [chat(client, body(user=f"shadow-{i}")) for i in range(6)]
    assert all(r.status_code == 200 and v == "v1" for r, v in answers)
    deadline = time.monotonic() + 10
    while metric(client, label) - before < 6 and time.monotonic() < deadline:
        time.sleep(0.05)  # the copies run after the answers
    skipped = metric(client, label.replace('"ok"', '"skipped"'))
    assert (metric(client, label) - before, skipped) == (6, 0)
    status = client.get("/v1/admin/models/demo/canary").json()
    assert status["state"] == "active" and status["window"]["canary"]["samples"] >= 6


def test_a_rollback_is_instant_and_what_is_in_flight_finishes_on_its_version(client, fault):
    set_canary(client, weight=1.0, mode="split")
    fault.set("slow", SLOW_S)  # a word and the end token: 2 forwards, the request stays in flight ~1.6 s
    result = {}
    worker = threading.Thread(target=lambda: result.update(zip(("r", "v"), chat(client, body(max_tokens=8)))))
    try:
        worker.start()
        deadline = time.monotonic() + 20
        while metric(client, 'mmserve_running_requests{model="demo@v2"}') < 1:
            assert time.monotonic() < deadline, "the request never reached the canary"
            time.sleep(0.02)
        rolled = client.post("/v1/admin/models/demo/rollback", json={"reason": "bad answers"}).json()
        assert rolled["state"] == "rolled_back" and rolled["weight"] == 0 and rolled["rollback"]["by"] == "anonymous"
        started = time.monotonic()
        assert [chat(client, body(user=f"after-{i}"))[1] for i in range(5)] == ["v1"] * 5
        assert worker.is_alive() or time.monotonic() - started < SLOW_S  # still in flight while v1 answered
        worker.join(30)
    finally:
        fault.set("")
    r, version = result["r"], result["v"]
    assert r.status_code == 200 and version == "v2"
    stable = chat(client, body(max_tokens=8, model="demo@v1"))[0].json()  # the same weights: the same answer
    assert r.json()["choices"] == stable["choices"] and r.json()["choices"][0]["finish_reason"] == "stop"
    assert metric(client, 'mmserve_rollbacks_total{model="demo",trigger="admin"}') == 1


def roll_until_back(client, prefix: str, limit: int = 80):
    """Requests from new end users until the canary is rolled back: [(status, version)] up to then."""
    seen = []
    for i in range(limit):
        r, version = chat(client, body(user=f"{prefix}-{i}"))
        seen.append((r.status_code, version))
        if client.get("/v1/admin/models/demo/canary").json()["state"] == "rolled_back":
            return seen
    raise AssertionError(f"no rollback after {limit} requests: {seen}")


def test_a_canary_that_raises_is_rolled_back_automatically(client, fault):
    set_canary(client, weight=0.5, mode="split")  # re-armed: an empty canary window
    fault.set("raise")
    try:
        seen = roll_until_back(client, "raise")
    finally:
        fault.set("")
    failed = [s for s, _ in seen if s == 500]
    assert len(failed) == MIN_SAMPLES  # the verdict comes with the first full sample, not later
    assert all(v == "v1" for s, v in seen if s == 200)
    status = client.get("/v1/admin/models/demo/canary").json()
    assert status["rollback"]["by"] == "auto" and "error rate 100.0%" in status["rollback"]["reason"]
    assert metric(client, 'mmserve_rollbacks_total{model="demo",trigger="auto"}') == 1
    assert [chat(client, body(user=f"raise-after-{i}"))[0].status_code for i in range(10)] == [200] * 10


def test_a_slow_canary_is_rolled_back_automatically(client, fault):
    set_canary(client, weight=0.5, mode="split")
    fault.set("slow", SLOW_S)
    try:
        seen = roll_until_back(client, "slow")
    finally:
        fault.set("")
    assert all(s == 200 for s, _ in seen)  # slow, not failing
    assert sum(v == "v2" for _, v in seen) == MIN_SAMPLES
    status = client.get("/v1/admin/models/demo/canary").json()
    assert "p95 latency" in status["rollback"]["reason"] and status["weight"] == 0
    assert metric(client, 'mmserve_rollbacks_total{model="demo",trigger="auto"}') == 2


def test_every_change_and_rollback_is_in_the_audit_log(client, audit_path):
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    canary = [r for r in records if r.get("kind") == "canary"]
    rollbacks = [(r["by"], r["reason"].split(" ")[0]) for r in canary if r["event"] == "canary_rollback"]
    assert rollbacks == [("anonymous", "bad"), ("auto", "error"), ("auto", "p95")]
    updates = [r for r in canary if r["event"] == "canary_update"]
    assert updates and all(r["model"] == "demo" and r["version"] == "v2" and "weight" in r for r in updates)
    requests = [r for r in records if r.get("kind") == "request" and r.get("route") == "/v1/chat/completions"]
    assert {r.get("model_version") for r in requests} >= {"v1", "v2"}  # each answer names its version
    assert verify_chain(audit_path).ok


def test_the_admin_api_names_what_is_wrong(client):
    r = client.get("/v1/admin/models/nope/canary")
    assert r.status_code == 404 and r.json()["error"]["code"] == "canary_not_found"
    r = client.put("/v1/admin/models/demo/canary", json={"weight": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "weight"
    r = client.put("/v1/admin/models/demo/canary", json={"mode": "mirror"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode"
    r = client.put("/v1/admin/models/demo/canary", json={"weigth": 0.1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "weigth"
    listed = client.get("/v1/admin/canaries").json()["data"]
    assert [c["model"] for c in listed] == ["demo"]


def test_the_cli_sets_and_rolls_back_through_the_admin_api(client):
    from app.canary.cli import canary_request
    from app.cli import build_parser

    def run(*argv):
        response = canary_request(client, build_parser().parse_args(["canary", *argv]))
        assert response.status_code == 200, response.text
        return response.json()

    assert run("set", "demo", "--weight", "0.25", "--mode", "split")["weight"] == 0.25
    assert run("status", "demo")["state"] == "active"
    rolled = run("rollback", "demo", "--reason", "from the cli")
    assert (rolled["state"], rolled["weight"], rolled["rollback"]["reason"]) == ("rolled_back", 0.0, "from the cli")
    assert [c["state"] for c in run("status")["data"]] == ["rolled_back"]


def test_admin_routes_need_the_admin_scope(client, data_dir, audit_path):
    """Last: once the store holds a key, every request needs one."""
    store = KeyStore(data_dir / "keys.sqlite3")
    chat_key, _ = store.add("team-a", frozenset({"chat"}))
    admin_key, admin = store.add("ops", frozenset({"admin"}))
    time.sleep(1.1)  # the server notices the store's first key within a second
    assert client.get("/v1/admin/canaries").status_code == 401
    r = client.put("/v1/admin/models/demo/canary", json={"weight": 0.1},
                   headers={"Authorization": f"Bearer {chat_key}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    r = client.put("/v1/admin/models/demo/canary", json={"weight": 0.1},
                   headers={"Authorization": f"Bearer {admin_key}"})
    assert r.status_code == 200 and r.json()["weight"] == 0.1
    last = [r for r in map(json.loads, audit_path.read_text().splitlines()) if r.get("kind") == "canary"][-1]
    assert last["by"] == admin.id and admin_key not in audit_path.read_text()
