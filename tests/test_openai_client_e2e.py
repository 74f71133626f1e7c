"""Every response type through the official `openai` client, unchanged, against a real server process on
loopback, with the client's strict response validation on: each answer must parse as the client's own
types (generated from OpenAI's schema), not merely be constructed from whatever arrived."""

from __future__ import annotations

import json

import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from tests.slow_server import image_url, running_server

IMAGE = {"type": "image_url", "image_url": {"url": image_url()}}
TRACE = {"x-request-id": "trace-e2e-1"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with running_server(0.0, {"MMSERVE_DATA_DIR": str(tmp_path_factory.mktemp("e2e-data"))}) as (base, _):
        yield OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, _strict_response_validation=True)


def test_models(client):
    [model] = client.models.list().data
    assert model.object == "model" and client.models.retrieve(model.id).id == model.id
    with pytest.raises(NotFoundError) as e:
        client.models.retrieve("gpt-9", extra_headers=TRACE)
    assert e.value.request_id == "trace-e2e-1" and e.value.code == "model_not_found"


def test_chat_completion_and_its_stream(client):
    raw = client.chat.completions.with_raw_response.create(
        model="mmserve-demo", max_tokens=4, messages=[{"role": "user", "content": [IMAGE]}], extra_headers=TRACE)
    assert raw.headers["x-request-id"] == "trace-e2e-1"
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.message.refusal is None and choice.logprobs is None and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(model="mmserve-demo", max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": [IMAGE]}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == 4


def test_a_parameter_not_honoured_is_refused_by_name(client):
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="mmserve-demo", messages=[{"role": "user", "content": [IMAGE]}],
                                       functions=[{"name": "lookup", "parameters": {}}], extra_headers=TRACE)
    assert (e.value.code, e.value.param, e.value.request_id) == ("unsupported_parameter", "functions", "trace-e2e-1")


def test_embeddings(client):
    # float: the client's strict validation types `embedding` as a list, so its own default (base64 on the
    # wire, decoded after validation) cannot pass it, against any server; tests/test_embeddings.py runs that path.
    result = client.embeddings.create(model="mmserve-demo", input=["a red square", image_url()], encoding_format="float")
    assert [d.index for d in result.data] == [0, 1] and len(result.data[0].embedding) > 1
    assert result.usage.prompt_tokens > 0


def test_files_and_batches(client):
    line = {"custom_id": "line", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "mmserve-demo", "max_tokens": 2, "messages": [{"role": "user", "content": [IMAGE]}]}}
    lines = "\n".join(json.dumps({**line, "custom_id": f"line-{i}"}) for i in range(20)).encode()
    uploaded = client.files.create(file=("in.jsonl", lines), purpose="batch")
    assert client.files.retrieve(uploaded.id).status == "processed"
    assert [f.id for f in client.files.list().data] == [uploaded.id]
    assert [f.id for f in client.files.list(purpose="batch", order="asc", limit=5)] == [uploaded.id]
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"owner": "e2e"})
    assert client.batches.retrieve(batch.id).metadata == {"owner": "e2e"}
    assert [b.id for b in client.batches.list().data] == [batch.id]
    cancelled = client.batches.cancel(batch.id)  # 20 lines take seconds: it is still running
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at is not None
    with pytest.raises(BadRequestError) as e:
        client.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert e.value.param == "expires_after"
