"""The chat API through the real app (litestar's test client), on the bundled demo model."""

from __future__ import annotations

import json

import pytest
from litestar.testing import TestClient

from app.server import create_app
from app.settings import Settings
from demo import world
from tests.conftest import data_url
from tests.independent_world import Obj, Scene, render

# a scene from the independent renderer: caption "a large green triangle above a small yellow circle"
SCENE = Scene("gray", [Obj("triangle", "green", "large", 60.0, 34.0, 48), Obj("circle", "yellow", "small", 64.0, 100.0, 20)])
URL = data_url(render(SCENE))


@pytest.fixture(scope="module")
def client(demo_runtime):
    settings = Settings(max_body_bytes=2_000_000, max_image_pixels=1_000_000)
    with TestClient(create_app(settings, demo_runtime)) as c:
        yield c


def chat(client, messages, **extra):
    return client.post("/v1/chat/completions", json={"model": "mmserve-demo", "messages": messages, **extra})


def user(text=None, url=URL):
    parts = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    return {"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}


def test_caption_in_openai_shape(client):
    r = chat(client, [user("describe the image.")])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "mmserve-demo"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "a large green triangle above a small yellow circle",
                                 "refusal": None}
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] > 5


def test_image_without_text_is_a_caption_request(client):
    r = chat(client, [user()])
    assert r.json()["choices"][0]["message"]["content"] == "a large green triangle above a small yellow circle"


def test_multi_turn_conversation(client):
    messages = [user("how many objects are there?")]
    answers = []
    for question, expected in [(None, "two"), ("what shape is the yellow object?", "circle"),
                               ("what shape is the green object?", "triangle")]:
        if question:
            messages += [{"role": "assistant", "content": answers[-1]}, {"role": "user", "content": question}]
        r = chat(client, messages)
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
        assert answers[-1] == expected


def test_stop_string_truncates(client):
    r = chat(client, [user("describe the image.")], stop=[" above"])
    assert r.json()["choices"][0]["message"]["content"] == "a large green triangle"
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_gives_finish_reason_length(client):
    r = chat(client, [user("describe the image.")], max_tokens=2)
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "a large" and choice["finish_reason"] == "length"


BAD = [
    ("malformed json", b"{not json", 400, "malformed"),
    ("no messages", {"messages": []}, 400, "messages must not be empty"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("no image", {"messages": [{"role": "user", "content": "hello"}]}, 400, "no image"),
    ("unknown model", {"model": "gpt-9", "messages": [user()]}, 404, "gpt-9"),
    ("n > 1", {"messages": [user()], "n": 2}, 400, "n > 1"),
    ("tools", {"messages": [user()], "tools": [{"type": "function"}]}, 400, "tools"),
    ("temperature", {"messages": [user()], "temperature": 2.5}, 400, "temperature must be in [0, 2]"),
    ("top_p", {"messages": [user()], "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("top_k", {"messages": [user()], "top_k": -1}, 400, "top_k must be >= 0"),
    ("frequency_penalty", {"messages": [user()], "frequency_penalty": 0.5}, 400, "repetition_penalty"),
    ("visual_tokens", {"messages": [user()], "visual_tokens": -3}, 400, "visual_tokens"),
    ("max_tokens 0", {"messages": [user()], "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ("negative max_tokens", {"messages": [user()], "max_tokens": -5}, 400, "max_tokens must be at least 1"),
    ("over context", {"messages": [user()], "max_tokens": 500}, 400, "maximum context length is 64 tokens"),
    ("two images", {"messages": [{"role": "user", "content": [user()["content"][0]] * 2}]}, 400, "at most 1"),
    ("not an image", {"messages": [user(url="data:image/png;base64,aGVsbG8gd29ybGQ=")]}, 400, "not an image"),
    ("empty image", {"messages": [user(url="data:image/png;base64,")]}, 400, "empty"),
    ("bad base64", {"messages": [user(url="data:image/png;base64,!!!")]}, 400, "base64"),
    ("remote url", {"messages": [user(url="http://169.254.169.254/latest")]}, 400, "remote image URLs are disabled"),
    ("text mime", {"messages": [user(url="data:text/plain;base64,aGk=")]}, 400, "not an image"),
    ("last message from assistant", {"messages": [user(), {"role": "assistant", "content": "x"}]}, 400, "last message"),
    ("assistant first", {"messages": [{"role": "assistant", "content": "x"}, user()]}, 400, "must follow"),
]


@pytest.mark.parametrize("name,body,status,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error_and_server_keeps_serving(client, name, body, status, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle.lower() in error["message"].lower(), error
    assert chat(client, [user("how many objects are there?")]).json()["choices"][0]["message"]["content"] == "two"


def test_context_error_names_both_numbers(client):
    r = chat(client, [user()], max_tokens=500)
    message = r.json()["error"]["message"]
    assert "64" in message and "500" in message


def test_pixel_cap_and_body_cap(client):
    from PIL import Image

    big = data_url(Image.new("RGB", (1200, 1000), (0, 0, 0)))  # 1.2 Mpx > the 1 Mpx cap set above
    r = chat(client, [user(url=big)])
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    r = client.post("/v1/chat/completions", content=b"x" * 2_100_000, headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_models_health_and_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "mmserve-demo"
    schema = client.get("/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_own_renderer_sample_matches_its_caption(client):
    from demo.samples.make_samples import SAMPLE_SCENE

    r = chat(client, [user(url=data_url(world.render(SAMPLE_SCENE)))])
    assert r.json()["choices"][0]["message"]["content"] == world.caption(SAMPLE_SCENE)


def sse_events(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[len("data: "):] for line in lines]


def test_streaming_sends_openai_chunks_that_add_up_to_the_non_streamed_answer(client):
    plain = chat(client, [user("describe the image.")]).json()["choices"][0]["message"]["content"]
    r = chat(client, [user("describe the image.")], stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "mmserve-demo" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 5


def test_streaming_errors_before_the_first_byte_are_plain_http_errors(client):
    r = chat(client, [user("describe the image.", url="data:image/png;base64,AAAA")], stream=True)
    assert r.status_code == 400 and "error" in r.json()


def test_sampling_options_are_honoured(client):
    def text(**extra):
        return chat(client, [user("describe the image.")], max_tokens=12, **extra).json()["choices"][0]["message"]["content"]
    assert text(temperature=1.0, top_k=1, seed=5) == text()  # top_k 1 is greedy
    assert text(temperature=2.0, seed=11) == text(temperature=2.0, seed=11)  # a seed reproduces
    assert text(stop=["triangle"]) == "a large green "  # everything before the stop string
    r = chat(client, [user("describe the image.")], stop=["triangle"])
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_every_answer_names_its_route_and_identification_is_answered_by_stage_1(client):
    one = data_url(render(Scene("white", [Obj("circle", "red", "large", 64.0, 64.0, 52)])))
    r = chat(client, [user("what is this?", url=one)])
    assert r.status_code == 200 and r.headers["x-mmserve-route"] == "stage1"
    assert r.json()["choices"][0]["message"]["content"] == "circle"
    r = chat(client, [user("describe the image.", url=one)])
    assert r.headers["x-mmserve-route"].startswith("decoder:")
    assert r.json()["choices"][0]["message"]["content"] == "a large red circle"
    streamed = chat(client, [user("what is this?", url=one)], stream=True)
    assert streamed.headers["x-mmserve-route"] == "stage1"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in sse_events(streamed)[:-1])
    assert text == "circle"


def test_repeated_image_is_a_feature_cache_hit_and_visual_tokens_reduce(client):
    def hot_hits():
        line = next(l for l in client.get("/metrics").text.splitlines()
                    if l.startswith('mmserve_feature_cache_hits_total{model="mmserve-demo",tier="hot"}'))
        return float(line.split()[-1])
    url = data_url(render(Scene("gray", [Obj("square", "blue", "small", 40.0, 40.0, 24)])))
    before = hot_hits()
    first = chat(client, [user("describe the image.", url=url)]).json()["choices"][0]["message"]["content"]
    again = chat(client, [user("describe the image.", url=url)]).json()["choices"][0]["message"]["content"]
    assert first == again == "a small blue square" and hot_hits() == before + 1
    reduced = chat(client, [user("describe the image.", url=url)], visual_tokens=32)
    assert reduced.status_code == 200 and reduced.json()["choices"][0]["message"]["content"]
