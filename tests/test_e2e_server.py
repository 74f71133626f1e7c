"""End to end through a real server process on loopback: README command (1)'s server, the curl it
prints, and the official `openai` client, unchanged."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import data_url
from tests import independent_world as iw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mmserve"), "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "MMSERVE_THREADS": "2"})
    printed = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        printed.append(line)
        if "curl" in line:
            break
    base = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not come up:\n" + "".join(printed))
    yield base, "".join(printed)
    proc.terminate()
    proc.wait(timeout=30)


def test_printed_curl_returns_the_sample_caption(server):
    base, printed = server
    assert base in printed
    curl = next(line.strip() for line in printed.splitlines() if line.strip().startswith("curl "))
    out = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60)
    reply = json.loads(out.stdout)
    assert reply["choices"][0]["message"]["content"] == "a large red circle left of a small blue square"


def test_openai_client_chat_and_three_turns(server):
    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    scene = iw.Scene("white", [iw.Obj("circle", "blue", "large", 40.0, 64.0, 50),
                               iw.Obj("triangle", "red", "small", 100.0, 60.0, 22)])
    url = data_url(iw.render(scene))
    assert [m.id for m in client.models.list().data] == ["mmserve-demo"]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "describe the image."}]}]
    reply = client.chat.completions.create(model="mmserve-demo", messages=messages)
    assert reply.choices[0].message.content == iw.caption(scene) == "a large blue circle left of a small red triangle"
    for question, expected in [("what shape is the red object?", "triangle"), ("is there a square?", "no")]:
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": question}]
        reply = client.chat.completions.create(model="mmserve-demo", messages=messages)
        assert reply.choices[0].message.content == expected


def test_openai_client_streaming_chat(server):
    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    scene = iw.Scene("gray", [iw.Obj("square", "yellow", "large", 64.0, 64.0, 48)])
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(iw.render(scene))}},
                                             {"type": "text", "text": "describe the image."}]}]
    stream = client.chat.completions.create(model="mmserve-demo", messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == iw.caption(scene) == "a large yellow square"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3  # really incremental
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 5  # four words and the end token


def test_openai_client_sees_errors_as_exceptions(server):
    import openai

    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="no image"):
        client.chat.completions.create(model="mmserve-demo", messages=[{"role": "user", "content": "hi"}])


def test_bad_input_table_through_the_real_server(server):
    """Every case of the HTTP table, on loopback: its status and message, then a good request succeeds."""
    from tests.test_http import BAD, URL, user

    base, _ = server
    with httpx.Client(timeout=30) as client:
        for name, body, status, needle in BAD:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.post(f"{base}/v1/chat/completions", content=content,
                            headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.text)
            error = r.json()["error"]
            assert needle.lower() in error["message"].lower() and set(error) == {"message", "type", "param", "code"}, name
            ok = client.post(f"{base}/v1/chat/completions", json={"messages": [user(url=URL)]})
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"], name
