"""Two families in one real server process on loopback, through the official `openai` client: the bundled
demo model (CoCa) and a Llama-3.2-Vision checkpoint laid out as the hub lays it out, started with
`mmserve serve --model NAME=DIR --model NAME=DIR`. Image chat, streaming, several images in a
conversation, a text-only turn, routing by the alias, per-model metrics, and the request id."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from openai import BadRequestError, NotFoundError, OpenAI
from PIL import Image

from bench.hf_checkpoints import PRESETS, write_mllama_checkpoint
from tests import independent_world as iw
from tests.conftest import data_url
from tests.slow_server import free_port

REPO = Path(__file__).resolve().parent.parent


def noise_url(h: int, w: int, seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


SCENE = data_url(iw.render(iw.Scene("white", [iw.Obj("circle", "red", "large", 64.0, 64.0, 50)])))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    llama = write_mllama_checkpoint(tmp_path_factory.mktemp("llama"), **PRESETS["tiny"], seed=4,
                                    template_file="chat_template.jinja", dtype=torch.float32)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                             "--model", "demo=models/demo", "--model", f"llama={llama}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MMSERVE_THREADS": "2", "MMSERVE_ROUTER_SMALL_MODEL": "demo",
                                 "MMSERVE_ROUTER_LARGE_MODEL": "llama", "MMSERVE_DATA_DIR": str(llama / "data")})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not become ready:\n" + proc.stdout.read())
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_both_models_and_the_alias_are_listed(client):
    assert [m.id for m in client.models.list()] == ["demo", "llama", "auto"]
    assert client.models.retrieve("llama").id == "llama"
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-9")


def test_llama_chat_streams_what_it_answers_in_one_piece(client):
    messages = [{"role": "user", "content": [image_part(noise_url(40, 60, 0)), {"type": "text", "text": "What?"}]}]
    whole = client.chat.completions.create(model="llama", messages=messages, max_tokens=10)
    assert whole.model == "llama" and whole.choices[0].message.refusal is None
    stream = client.chat.completions.create(model="llama", messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_llama_takes_several_images_and_a_text_only_turn(client):
    conversation = [{"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": "Hi."},
                    {"role": "user", "content": [image_part(noise_url(20, 20, 1)), {"type": "text", "text": "and"},
                                                 image_part(noise_url(40, 44, 2))]},
                    {"role": "assistant", "content": "Two pictures."},
                    {"role": "user", "content": [image_part(noise_url(30, 30, 3)), {"type": "text", "text": "now?"}]}]
    reply = client.chat.completions.create(model="llama", messages=conversation, max_tokens=6)
    assert reply.usage.completion_tokens >= 1
    text_only = client.chat.completions.create(model="llama", messages=conversation[:1], max_tokens=6)
    assert text_only.choices[0].finish_reason in ("stop", "length")


def test_demo_answers_and_refuses_what_it_cannot(client):
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [
        image_part(SCENE), {"type": "text", "text": "how many objects are there?"}]}])
    assert reply.choices[0].message.content == "one"
    with pytest.raises(BadRequestError) as error:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hello"}])
    assert error.value.body["code"] == "missing_image"


def test_the_alias_routes_by_capability_and_rules(server, client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Hello there"}], max_tokens=4)
    assert raw.headers["x-mmserve-model"] == "llama"  # only llama takes a text-only conversation
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": [
        image_part(SCENE), {"type": "text", "text": "how many objects are there?"}]}])
    assert raw.headers["x-mmserve-model"] == "demo" and raw.parse().choices[0].message.content == "one"
    metrics = httpx.get(f"{server}/metrics").text
    assert 'mmserve_generated_tokens_total{model="llama"}' in metrics
    assert 'mmserve_generated_tokens_total{model="demo"}' in metrics


def test_every_response_carries_a_request_id(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "llama", "messages": []},
                   headers={"x-request-id": "trace-42"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "trace-42"
    assert r.json()["request_id"] == "trace-42"
    assert httpx.get(f"{server}/health").headers["x-request-id"].startswith("req_")
    r = httpx.get(f"{server}/health", headers={"x-request-id": "bad id with spaces"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request_id"
