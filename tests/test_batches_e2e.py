"""Batches through a real server process on loopback: the official `openai` client, unchanged, and a
server killed with SIGKILL in the middle of a batch, then restarted on the same database."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from demo import world
from tests.conftest import data_url

MMSERVE = str(Path(sys.executable).parent / "mmserve")
FINAL = ("completed", "failed", "cancelled", "expired")
# The demo model captions about 97% of scenes right; seed 13 is one of its mistakes, so it is left out
# here, where the point is that every answer arrives exactly once.
SEEDS = [seed for seed in range(31) if seed != 13]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([MMSERVE, "serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MMSERVE_THREADS": "2", "MMSERVE_DATA_DIR": str(data_dir), **env})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"server did not come up:\n{proc.stdout.read()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


def request_lines(scenes: list[world.Scene]) -> bytes:
    lines = [{"custom_id": f"image-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "mmserve-demo", "max_tokens": 16, "messages": [{"role": "user", "content": [
                  {"type": "image_url", "image_url": {"url": data_url(world.render(scene))}},
                  {"type": "text", "text": "describe the image."}]}]}} for i, scene in enumerate(scenes)]
    return "\n".join(json.dumps(line) for line in lines).encode() + b"\n"


def captions_by_id(output: str) -> dict[str, str]:
    lines = [json.loads(line) for line in output.splitlines()]
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)), f"a request answered twice: {sorted(ids)}"
    return {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in lines}


def answered_in_db(db: Path, batch_id: str) -> dict[str, str]:
    """custom_id -> output-line id of every line the database holds an answer for."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT custom_id, result FROM batch_lines WHERE batch_id = ? AND status_code IS NOT NULL",
                            (batch_id,)).fetchall()
    return {custom_id: json.loads(result)["id"] for custom_id, result in rows}


@pytest.fixture(scope="module")
def killed_and_restarted(tmp_path_factory):
    """A server killed with SIGKILL a few lines into a batch of 30, then a new server on the same data
    dir (kept running for the tests here: starting one takes a while on a busy machine)."""
    data_dir = tmp_path_factory.mktemp("batch-data")
    scenes = [world.sample_scene(random.Random(seed)) for seed in SEEDS]
    # One line at a time, so the batch lasts long enough to be killed in the middle of it.
    proc, base = start_server(data_dir, MMSERVE_BATCH_CONCURRENCY="1")
    try:
        file_id = httpx.post(f"{base}/v1/files", files={"file": ("in.jsonl", request_lines(scenes))},
                             data={"purpose": "batch"}, timeout=30).json()["id"]
        batch_id = httpx.post(f"{base}/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                          "completion_window": "24h"}, timeout=30).json()["id"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = httpx.get(f"{base}/v1/batches/{batch_id}", timeout=5).json()["request_counts"]
            if counts["completed"] >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop(proc)
    answered_before_restart = answered_in_db(data_dir / "batches.sqlite3", batch_id)
    proc, base = start_server(data_dir)
    try:
        yield base, batch_id, scenes, answered_before_restart
    finally:
        stop(proc)


def test_a_server_killed_mid_batch_finishes_it_after_restart_answering_each_line_once(killed_and_restarted):
    base, batch_id, scenes, before = killed_and_restarted
    assert 3 <= len(before) < len(scenes), f"the kill did not land mid-batch ({len(before)} answered)"
    deadline = time.monotonic() + 90
    while (batch := httpx.get(f"{base}/v1/batches/{batch_id}", timeout=5).json())["status"] not in FINAL:
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == len(scenes), batch
    output = httpx.get(f"{base}/v1/files/{batch['output_file_id']}/content", timeout=30).text
    captions = captions_by_id(output)
    assert captions == {f"image-{i}": world.caption(scene) for i, scene in enumerate(scenes)}
    # Lines answered before the kill were not run again: their output lines are the ones stored then.
    ids_after = {json.loads(line)["custom_id"]: json.loads(line)["id"] for line in output.splitlines()}
    assert {custom_id: ids_after[custom_id] for custom_id in before} == before


def test_openai_client_runs_a_batch(killed_and_restarted):
    base = killed_and_restarted[0]
    scenes = [world.sample_scene(random.Random(seed)) for seed in SEEDS[:5]]
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    uploaded = client.files.create(file=("captions.jsonl", request_lines(scenes)), purpose="batch")
    assert uploaded.purpose == "batch" and client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"owner": "test"})
    deadline = time.monotonic() + 90
    while batch.status not in FINAL and time.monotonic() < deadline:
        time.sleep(0.1)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 5, 0)
    assert batch.error_file_id is None and batch.metadata == {"owner": "test"}
    captions = captions_by_id(client.files.content(batch.output_file_id).text)
    assert captions == {f"image-{i}": world.caption(scene) for i, scene in enumerate(scenes)}
    assert batch.id in [b.id for b in client.batches.list(limit=10).data]
