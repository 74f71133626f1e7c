"""mmserve on a local Ray cluster on loopback (marked `ray`; skipped without `pip install -e '.[ray]'`):
two replicas answer behind the gateway, /metrics merges both, a batch whose replica is killed with SIGKILL
mid-batch is finished by the other with every line answered once, and requests in flight on a killed
replica get 503 + Retry-After, never a hang. One cluster for the module (~1-2 min to start on 2 cores)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
httpx = pytest.importorskip("httpx")

from app.settings import Settings  # noqa: E402
from demo import world  # noqa: E402
from tests.conftest import data_url  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from app.scale.ray_serve import Topology, application

    data = tmp_path_factory.mktemp("ray-data")
    port = free_port()
    settings = Settings(data_dir=data, threads=1, ray_replica_cpus=0.5, batch_lease_s=3.0, batch_poll_s=0.2,
                        batch_concurrency=1, ray_metrics_interval_s=0.5, overload_retry_after_s=2,
                        request_timeout_s=20)
    from app.scale.local_ray import start_ray

    start_ray(num_cpus=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(settings, Topology(replicas=2)), name="mmserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}", data, settings
    finally:
        serve.shutdown()
        ray.shutdown()


def chat(base: str, seed: int, timeout: float = 120) -> httpx.Response:
    scene = world.sample_scene(random.Random(seed))
    return httpx.post(f"{base}/v1/chat/completions", timeout=timeout, json={
        "model": "mmserve-demo", "max_tokens": 16, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(world.render(scene))}},
            {"type": "text", "text": "describe the image."}]}]})


def test_two_replicas_answer_and_metrics_merge_both(cluster):
    base, _, _ = cluster
    seen = replica_names(base)
    assert len(seen) == 2, seen
    answer = chat(base, 1)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    time.sleep(1.5)  # a publish interval or two
    text = httpx.get(f"{base}/metrics", timeout=30).text
    for name in seen:  # both replicas' series, each labelled
        assert f'mmserve_requests_total{{model="",replica="{name}",route="/health",status="200"}}' in text, text[:2000]
    one = httpx.get(f"{base}/metrics", params={"replica": sorted(seen)[0]}, timeout=30).text
    assert 'route="/health"' in one and "replica=" not in one  # one replica's own exposition
    assert httpx.get(f"{base}/metrics", params={"replica": "nobody"}, timeout=30).status_code == 404


def lease_owner(data, batch_id: str) -> str | None:
    import sqlite3
    with sqlite3.connect(data / "batches.sqlite3") as conn:
        row = conn.execute("SELECT owner FROM batch_leases WHERE batch_id = ?", (batch_id,)).fetchone()
    return row[0] if row else None


def test_a_replica_killed_mid_batch_leaves_it_to_the_other_with_each_line_answered_once(cluster):
    base, data, _ = cluster
    lines = [{"custom_id": f"image-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "mmserve-demo", "max_tokens": 16, "messages": [{"role": "user", "content": [
                  {"type": "image_url", "image_url": {"url": data_url(world.render(world.sample_scene(
                      random.Random(i))))}},
                  {"type": "text", "text": "describe the image."}]}]}} for i in range(24)]
    content = ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
    file = httpx.post(f"{base}/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"},
                      timeout=60).json()
    batch = httpx.post(f"{base}/v1/batches", timeout=60, json={
        "input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()
    deadline = time.monotonic() + 120
    while (got := httpx.get(f"{base}/v1/batches/{batch['id']}", timeout=30).json())["request_counts"]["completed"] < 3:
        assert time.monotonic() < deadline, f"batch did not start: {got}"
        time.sleep(0.2)
    owner = lease_owner(data, batch["id"])
    assert owner is not None
    os.kill(int(owner.split(":")[1]), signal.SIGKILL)  # the replica holding the batch dies mid-batch
    deadline = time.monotonic() + 240
    while (got := httpx.get(f"{base}/v1/batches/{batch['id']}", timeout=30).json())["status"] != "completed":
        assert time.monotonic() < deadline, f"batch not finished after the kill: {got}"
        time.sleep(0.5)
    output = httpx.get(f"{base}/v1/files/{got['output_file_id']}/content", timeout=30).text
    ids = [json.loads(line)["custom_id"] for line in output.splitlines()]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines) and len(ids) == len(set(ids))
    assert lease_owner(data, batch["id"]) is None


def replica_names(base: str) -> set[str]:
    return {httpx.get(f"{base}/health", timeout=30).headers["x-mmserve-replica"] for _ in range(30)}


def kill_replica(name: str) -> None:
    """What a crash does to a replica (its process killed, no drain): Serve names the actor
    SERVE_REPLICA::APP#DEPLOYMENT#ID; our replica names are DEPLOYMENT-ID."""
    deployment, _, unique_id = name.partition("-")
    ray.kill(ray.get_actor(f"SERVE_REPLICA::mmserve#{deployment}#{unique_id}", namespace="serve"), no_restart=True)


def test_requests_on_a_killed_replica_get_503_with_retry_after_never_a_hang(cluster):
    base, _, _ = cluster
    replicas = replica_names(base)
    assert len(replicas) == 2, replicas
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(chat, base, 100 + i, 90) for i in range(8)]
        time.sleep(0.5)
        for name in replicas:
            kill_replica(name)
        answers = [p.result() for p in pending]  # each within request_timeout_s + 5 s: no hang
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes, codes
    for a in answers:
        if a.status_code == 503:
            assert a.headers["retry-after"] == "2" and a.json()["error"]["code"] == "replica_unavailable"


def replica_counts() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications["mmserve"].deployments["mmserve"].replica_states)


def test_autoscaling_on_requests_in_flight_stays_within_its_bounds(cluster):
    """Redeployed as 1..2 replicas aiming at 1 request in flight each: 6 clients busy push it to 2 (never
    more), within the bound below."""
    import threading

    from ray import serve

    from app.scale.ray_serve import Topology, application

    base, _, settings = cluster
    serve.run(application(settings, Topology(autoscale=(1, 2), target_ongoing_requests=1.0, upscale_delay_s=1.0,
                                             downscale_delay_s=600.0)), name="mmserve", route_prefix="/")
    deadline = time.monotonic() + 240
    while sum(replica_counts().values()) != 1 or replica_counts().get("RUNNING") != 1:
        assert time.monotonic() < deadline, f"not settled at 1 replica: {replica_counts()}"
        time.sleep(1)
    stop, peak = threading.Event(), [0]

    def client(seed: int) -> None:
        while not stop.is_set():
            chat(base, seed, timeout=60)

    threads = [threading.Thread(target=client, args=(200 + i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 300
        while replica_counts().get("RUNNING", 0) < 2:
            peak[0] = max(peak[0], sum(replica_counts().values()))
            assert time.monotonic() < deadline, f"did not scale up under load: {replica_counts()}"
            time.sleep(1)
        for _ in range(5):  # still bounded by max_replicas under the same load
            peak[0] = max(peak[0], sum(replica_counts().values()))
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(70)
    assert peak[0] <= 2 and replica_counts().get("RUNNING") == 2
