"""The Ray-free parts of scaling out: a request through an app in memory (what a Ray Serve replica runs),
the merged /metrics across replicas, and `mmserve serve --ray`'s refusals of bad input."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from litestar import Litestar, get, post
from litestar.response import Stream
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.scale.asgi_call import Head, HTTPCall, call
from app.scale.replica_metrics import fresh, merged, publish, withdraw

ROOT = Path(__file__).resolve().parent.parent


@post("/echo", status_code=201)
async def echo(data: dict) -> dict:
    return {"got": data}


@get("/stream")
async def stream() -> Stream:
    async def words():
        for word in ("a", "b", "c"):
            yield word.encode()
    return Stream(words(), headers={"x-kind": "words"})


def test_a_request_through_an_app_in_memory_streams_head_then_body():
    app = Litestar([echo, stream])

    async def main():
        body = b'{"x": 1}'
        pieces = [p async for p in call(app, HTTPCall("POST", "/echo", b"", ((b"content-type", b"application/json"),
                                                                              (b"content-length", b"8")), body))]
        head, rest = pieces[0], b"".join(pieces[1:])
        assert isinstance(head, Head) and head.status == 201 and rest == b'{"got":{"x":1}}'
        pieces = [p async for p in call(app, HTTPCall("GET", "/stream", b"", (), b""))]
        assert dict(pieces[0].headers)[b"x-kind"] == b"words" and pieces[1:] == [b"a", b"b", b"c"]
        missing = [p async for p in call(app, HTTPCall("GET", "/nope", b"", (), b""))]
        assert missing[0].status == 404
    asyncio.run(main())


def exposition(count: float) -> bytes:
    registry = CollectorRegistry()
    Counter("mmserve_requests", "HTTP requests answered", ["route"], registry=registry).labels("/x").inc(count)
    return generate_latest(registry)


def test_metrics_of_live_replicas_merge_with_a_replica_label(tmp_path):
    publish(tmp_path, "mmserve-a", exposition(3))
    publish(tmp_path, "mmserve-b", exposition(4))
    publish(tmp_path, "mmserve-dead", exposition(100))
    old = time.time() - 60
    os.utime(tmp_path / "mmserve-dead.prom", (old, old))  # stopped refreshing: left out
    live = fresh(tmp_path, max_age_s=10)
    assert sorted(live) == ["mmserve-a", "mmserve-b"]
    [family] = [f for f in text_string_to_metric_families(merged(live).decode()) if f.name == "mmserve_requests"]
    totals = {s.labels["replica"]: s.value for s in family.samples if s.name == "mmserve_requests_total"}
    assert totals == {"mmserve-a": 3, "mmserve-b": 4}
    assert merged(live).count(b"# TYPE mmserve_requests_total counter") == 1  # one family, both replicas
    withdraw(tmp_path, "mmserve-a")
    assert sorted(fresh(tmp_path, 10)) == ["mmserve-b"]


def mmserve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def ray_installed() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(ray_installed(), reason="checks the message a Ray-less install gives")
def test_ray_flag_without_ray_names_the_extra_to_install():
    done = mmserve("serve", "--ray")
    assert done.returncode == 2 and "pip install 'mmserve[ray]'" in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("args,message", [
    (["--ray", "--replicas", "0"], "--replicas must be at least 1, got 0"),
    (["--ray", "--autoscale", "3:1"], "--autoscale MIN:MAX needs 1 <= MIN <= MAX, got 3:1"),
    (["--ray", "--autoscale", "two"], "--autoscale takes MIN:MAX"),
    (["--replicas", "2"], "--replicas, --autoscale and --ray-address go with --ray"),
])
def test_bad_scale_flags_are_one_line_errors_at_start(args, message):
    if "--ray" in args and not ray_installed():
        pytest.skip("Ray is not installed: --ray stops at the install hint first")
    started = time.monotonic()
    done = mmserve("serve", *args)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert time.monotonic() - started < 150  # no cluster wait: the check runs before Ray starts (slow box)
