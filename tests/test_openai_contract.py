"""OpenAI's contract (tests/openai_contract.py) on real responses of the real app, on the bundled demo
model: every object carries the fields the schema requires, with their types, and leaves out the optional
ones it has no value for; every parameter is honoured, honoured only at its neutral values, or refused by
name; one request id runs end to end; and the official `openai` client parses every answer strictly."""

from __future__ import annotations

import importlib
import json
import logging
import time

import msgspec
import pytest
from litestar.testing import TestClient
from openai import BadRequestError, NotFoundError, OpenAI

from app.batches.schemas import CreateBatchRequest
from app.chat.schemas import ChatCompletionRequest, ChatMessage, ContentPart
from app.embeddings.schemas import EmbeddingRequest
from app.request_id import VALID, RequestIdFilter
from app.server import create_app
from app.settings import Settings
from tests import openai_contract as oc
from tests.conftest import data_url
from tests.independent_world import Obj, Scene, render

URL = data_url(render(Scene("gray", [Obj("circle", "red", "large", 64.0, 64.0, 40)])))
IMAGE = {"type": "image_url", "image_url": {"url": URL}}
USER = {"role": "user", "content": [IMAGE, {"type": "text", "text": "describe the image."}]}
MAX_BODY = 200_000


@pytest.fixture(scope="module")
def client(demo_runtime, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("contract"), max_body_bytes=MAX_BODY)
    with TestClient(create_app(settings, demo_runtime)) as c:
        yield c


def chat(client, messages=None, headers=None, **params):
    body = {"model": "mmserve-demo", "max_tokens": 2, "messages": messages or [USER], **params}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def conforms(value, kind) -> None:
    found = oc.problems(value, kind)
    assert not found, "\n".join(found)


def refused(r, param: str) -> dict:
    """A 400 `unsupported_parameter` naming `param` (or a place inside it)."""
    assert r.status_code == 400, r.text
    body = r.json()
    conforms(body, oc.ERROR_RESPONSE)
    error = body["error"]
    assert error["code"] == "unsupported_parameter", error
    assert error["param"] == param or error["param"].startswith((f"{param}[", f"{param}.")), error
    return error


def sse(r) -> list[dict]:
    assert r.status_code == 200, r.text
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line.strip()]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


# -- the tables against the schema, the client and our request types ------------------------------------
def client_params(endpoint: oc.Endpoint) -> set[str]:
    module, name = endpoint.client_params.split(":")
    typed = getattr(importlib.import_module(module), name)
    return set(typed.__required_keys__ | typed.__optional_keys__) | endpoint.extra


@pytest.mark.parametrize("name", sorted(oc.ENDPOINTS))
def test_each_table_lists_every_parameter_of_the_openai_client(name):
    endpoint = oc.ENDPOINTS[name]
    ours = {p.name for p in endpoint.table.values() if p.openai}
    assert ours == client_params(endpoint)


def test_the_tables_list_every_parameter_of_the_published_schema():
    assert {p.name for p in oc.CHAT_PARAMS.values() if p.openai} == oc.SPEC_CHAT_PARAMS | oc.CLIENT_ONLY_CHAT_PARAMS
    assert oc.CLIENT_ONLY_CHAT_PARAMS <= client_params(oc.ENDPOINTS["chat"])
    assert set(oc.EMBEDDING_PARAMS) == oc.SPEC_EMBEDDING_PARAMS


@pytest.mark.parametrize("struct,table", [(ChatCompletionRequest, oc.CHAT_PARAMS), (ChatMessage, oc.MESSAGE_FIELDS),
                                          (EmbeddingRequest, oc.EMBEDDING_PARAMS), (CreateBatchRequest, oc.BATCH_PARAMS)])
def test_our_request_types_have_a_field_for_every_parameter_and_no_other(struct, table):
    """A documented parameter must reach the table's decision (honour, neutral, refuse by name), never
    the unknown-field error, and an undocumented field of ours must be an extension the table lists."""
    assert {f.name for f in msgspec.structs.fields(struct)} == set(table)


def test_content_parts_are_typed_for_every_part_openai_documents():
    tags = {part.__struct_config__.tag for part in ContentPart.__args__}
    assert tags == set(oc.CONTENT_PARTS)


# -- chat parameters -------------------------------------------------------------------------------------
CHAT_REFUSED = [(p.name, v) for p in oc.CHAT_PARAMS.values() for v in p.refused]


@pytest.mark.parametrize("name,value", CHAT_REFUSED, ids=[f"{n}={v!r}"[:60] for n, v in CHAT_REFUSED])
def test_a_parameter_not_honoured_is_a_400_naming_it(client, name, value):
    error = refused(chat(client, **{name: value}), name)
    assert name in error["message"]


def test_the_deprecated_functions_and_function_call_are_refused_by_name_not_ignored(client):
    assert "deprecated" in refused(chat(client, functions=[{"name": "lookup", "parameters": {}}]), "functions")["message"]
    assert "deprecated" in refused(chat(client, function_call={"name": "lookup"}), "function_call")["message"]
    assert "deprecated" in refused(chat(client, function_call="auto"), "function_call")["message"]


def test_every_parameter_at_its_neutral_and_honoured_values_is_answered_in_openai_shape(client):
    rows = [p for p in oc.CHAT_PARAMS.values() if p.ok]
    for k in range(max(len(p.ok) for p in rows)):  # request k sends each parameter's k-th value
        params = {p.name: p.ok[k] for p in rows if k < len(p.ok)}
        r = chat(client, **params)
        assert r.status_code == 200, (params, r.text)
        conforms(r.json(), oc.CHAT_COMPLETION)


def test_null_is_neutral_for_every_parameter(client):
    nulls = {name: None for name in oc.CHAT_PARAMS if name != "messages"}
    r = client.post("/v1/chat/completions", json={"messages": [USER], **nulls})
    assert r.status_code == 200, r.text
    conforms(r.json(), oc.CHAT_COMPLETION)


def test_stream_options_table(client):
    for name, row in oc.STREAM_OPTIONS.items():
        for value in row.ok:
            assert sse(chat(client, stream=True, stream_options={name: value}))
        for value in row.refused:
            refused(chat(client, stream=True, stream_options={name: value}), f"stream_options.{name}")
    refused(chat(client, stream=True, stream_options={"include_everything": True}), "stream_options.include_everything")


def test_message_fields_table(client):
    conversation = [{"role": "system", "content": "be brief"}, {"role": "developer", "content": "be exact"},
                    {**USER, "name": "alice"}, {"role": "assistant", "content": "a circle", "refusal": None},
                    {"role": "user", "content": "what colour is it?"}]
    assert {m["role"] for m in conversation} == set(oc.MESSAGE_FIELDS["role"].ok)
    r = chat(client, conversation)
    assert r.status_code == 200, r.text
    conforms(r.json(), oc.CHAT_COMPLETION)
    for row in oc.MESSAGE_FIELDS.values():
        for value in row.refused:
            message = {"role": "assistant", "content": "x", row.name: value}
            refused(chat(client, [USER, message, USER]), f"messages[1].{row.name}")


def test_content_parts_table(client):
    for row in oc.CONTENT_PARTS.values():
        for part in row.refused:
            refused(chat(client, [{"role": "user", "content": [IMAGE, part]}]), "messages[0].content[1].type")
    detail = oc.IMAGE_DETAIL
    for value in detail.ok:
        assert chat(client, [{"role": "user", "content": [{**IMAGE, "image_url": {"url": URL, "detail": value}}]}]).status_code == 200
    for value in detail.refused:
        r = chat(client, [{"role": "user", "content": [{**IMAGE, "image_url": {"url": URL, "detail": value}}]}])
        refused(r, "messages[0].content[0].image_url.detail")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [USER], "best_of": 2}, "best_of"),
    ("/v1/chat/completions", {"messages": [{**USER, "weight": 2}]}, "messages[0].weight"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "bold": True}]}]},
     "messages[0].content[0].bold"),
    ("/v1/embeddings", {"input": "a red circle", "normalize": False}, "normalize"),
    ("/v1/classify", {"image": URL, "temperature": 2}, "temperature"),
    ("/v1/batches", {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h",
                     "priority": 1}, "priority"),
])
def test_an_unknown_field_is_a_400_naming_it(client, path, body, param):
    assert "not part of this API" in refused(client.post(path, json=body), param)["message"]


# -- embeddings ------------------------------------------------------------------------------------------
def test_embedding_parameters_table(client):
    width = len(client.post("/v1/embeddings", json={"input": "x"}).json()["data"][0]["embedding"])
    for row in oc.EMBEDDING_PARAMS.values():
        for value in row.ok:
            value = width if value is oc.OWN_WIDTH else value
            body = {"input": "a red circle", row.name: value}
            r = client.post("/v1/embeddings", json=body)
            assert r.status_code == 200, (body, r.text)
            conforms(r.json(), oc.EMBEDDING_LIST)
        for value in row.refused:
            refused(client.post("/v1/embeddings", json={"input": "a red circle", row.name: value}), row.name)


# -- models, files, batches ------------------------------------------------------------------------------
def test_models_list_and_retrieve(client):
    models = client.get("/v1/models").json()
    conforms(models, oc.MODEL_LIST)
    for card in models["data"]:
        conforms(client.get(f"/v1/models/{card['id']}").json(), oc.MODEL)


def request_lines(n: int) -> bytes:
    body = {"model": "mmserve-demo", "max_tokens": 2, "messages": [USER]}
    return b"".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}).encode() + b"\n" for i in range(n))


def upload(client, content: bytes, **form) -> dict:
    r = client.post("/v1/files", files={"file": ("in.jsonl", content, "application/jsonl")},
                    data={"purpose": "batch", **form})
    assert r.status_code == 200, r.text
    conforms(r.json(), oc.FILE)
    return r.json()


def test_file_objects_and_the_files_list(client):
    ids = [upload(client, request_lines(1))["id"] for _ in range(3)]
    conforms(client.get(f"/v1/files/{ids[0]}").json(), oc.FILE)
    newest = client.get("/v1/files").json()
    conforms(newest, oc.FILE_LIST)
    listed = [f["id"] for f in newest["data"]]
    assert listed[:3] == ids[::-1] and newest["first_id"] == listed[0] and newest["last_id"] == listed[-1]
    oldest = client.get("/v1/files", params={"order": "asc"}).json()
    assert [f["id"] for f in oldest["data"]] == listed[::-1]
    # pages of one: `after` is the last id of the previous page
    page1 = client.get("/v1/files", params={"limit": 1}).json()
    page2 = client.get("/v1/files", params={"limit": 1, "after": page1["last_id"]}).json()
    assert page1["has_more"] and [page1["data"][0]["id"], page2["data"][0]["id"]] == listed[:2]
    assert all(f["purpose"] == "batch" for f in client.get("/v1/files", params={"purpose": "batch"}).json()["data"])
    empty = client.get("/v1/files", params={"purpose": "fine-tune"}).json()
    conforms(empty, oc.FILE_LIST)
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    for bad in ({"limit": 0}, {"limit": 10_001}, {"order": "newest"}):
        r = client.get("/v1/files", params=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), r.text


def test_file_upload_parameters_table(client):
    r = client.post("/v1/files", files={"file": ("in.jsonl", request_lines(1))},
                    data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"})
    assert "never expire" in refused(r, "expires_after")["message"]


def wait_for(client, batch_id: str, statuses: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + 60
    while (batch := client.get(f"/v1/batches/{batch_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)
    return batch


def create_batch(client, file_id: str, **extra):
    return client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                            "completion_window": "24h", **extra})


def test_batch_objects_leave_out_the_fields_they_have_no_value_for(client):
    file_id = upload(client, request_lines(2))["id"]
    created = create_batch(client, file_id, metadata={"owner": "contract"}).json()
    conforms(created, oc.BATCH)
    assert created["metadata"] == {"owner": "contract"} and "output_file_id" not in created
    done = wait_for(client, created["id"], ("completed",))
    conforms(done, oc.BATCH)
    assert "error_file_id" not in done and "errors" not in done and "cancelled_at" not in done
    assert done["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    output = client.get(f"/v1/files/{done['output_file_id']}").json()
    conforms(output, oc.FILE)
    assert output["purpose"] == "batch_output"
    cancelled = client.post(f"/v1/batches/{create_batch(client, upload(client, request_lines(30))['id']).json()['id']}/cancel").json()
    conforms(cancelled, oc.BATCH)
    assert cancelled["status"] in ("cancelling", "cancelled") and "completed_at" not in cancelled
    listed = client.get("/v1/batches").json()
    conforms(listed, oc.BATCH_LIST)
    assert listed["first_id"] == cancelled["id"] and "metadata" not in listed["data"][0]
    refused(create_batch(client, file_id, output_expires_after={"anchor": "created_at", "seconds": 3600}),
            "output_expires_after")


def test_a_failed_batch_names_its_errors_and_an_empty_list_has_no_ids(demo_runtime, tmp_path):
    with TestClient(create_app(Settings(data_dir=tmp_path), demo_runtime)) as before:
        empty = before.get("/v1/batches").json()
        conforms(empty, oc.BATCH_LIST)
        assert empty == {"object": "list", "data": [], "has_more": False}
        file_id = upload(before, request_lines(3))["id"]
    # a restart with a lower limit: the stored file is now over it, and the batch fails validating
    with TestClient(create_app(Settings(data_dir=tmp_path, max_batch_requests=2), demo_runtime)) as after:
        failed = wait_for(after, create_batch(after, file_id).json()["id"], ("failed",))
    conforms(failed, oc.BATCH)
    assert failed["errors"]["data"][0]["code"] == "invalid_input_file" and failed["errors"]["data"][0]["line"] == 3
    assert "output_file_id" not in failed and "completed_at" not in failed


# -- streaming -------------------------------------------------------------------------------------------
def test_stream_chunks_carry_usage_only_when_asked(client):
    chunks = sse(chat(client, stream=True, max_tokens=4))
    for chunk in chunks:
        conforms(chunk, oc.CHAT_CHUNK)
        assert "usage" not in chunk
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    counted = sse(chat(client, stream=True, max_tokens=4, stream_options={"include_usage": True}))
    for chunk in counted:
        conforms(chunk, oc.CHAT_CHUNK)
    assert all(chunk["usage"] is None for chunk in counted[:-1])
    assert counted[-1]["choices"] == [] and counted[-1]["usage"]["completion_tokens"] == 4


# -- errors and the request id ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(demo_runtime, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("guarded"), api_keys="key-1", rate_limit_rpm=1,
                        rate_limit_burst=2)
    with TestClient(create_app(settings, demo_runtime)) as c:
        yield c


def test_every_answer_carries_the_request_id_it_was_given(client, guarded):
    def given(request_id, send, status):
        r = send({"x-request-id": request_id})
        assert r.status_code == status, r.text
        assert r.headers["x-request-id"] == request_id
        if status >= 400:
            conforms(r.json(), oc.ERROR_RESPONSE)
            assert r.json()["request_id"] == request_id
        return r

    given("ok-1", lambda h: client.get("/v1/models", headers=h), 200)
    given("chat:2", lambda h: chat(client, headers=h), 200)
    given("stream.3", lambda h: chat(client, headers=h, stream=True), 200)
    given("bad-4", lambda h: chat(client, headers=h, n=3), 400)
    given("missing-5", lambda h: client.get("/v1/models/gpt-9", headers=h), 404)
    given("nowhere-6", lambda h: client.get("/v1/nothing/here", headers=h), 404)
    given("method-7", lambda h: client.delete("/v1/models", headers=h), 405)
    given("big-8", lambda h: client.post("/v1/chat/completions", content=b"x" * (MAX_BODY + 1),
                                         headers={**h, "content-type": "application/json"}), 413)
    given("nokey-9", lambda h: guarded.get("/v1/models", headers=h), 401)
    key = {"Authorization": "Bearer key-1"}
    given("key-10", lambda h: guarded.get("/v1/models", headers={**h, **key}), 200)
    given("key-11", lambda h: guarded.get("/v1/models", headers={**h, **key}), 200)
    given("limited-12", lambda h: guarded.get("/v1/models", headers={**h, **key}), 429)


@pytest.mark.parametrize("bad", ["has spaces", "x" * 129, "semi;colon", "quote\"d", ""])
def test_an_invalid_request_id_is_refused_under_an_id_of_our_own(client, bad):
    r = client.get("/health", headers={"x-request-id": bad})
    assert r.status_code == 400, r.text
    conforms(r.json(), oc.ERROR_RESPONSE)
    assert r.json()["error"]["code"] == "invalid_request_id"
    assert r.headers["x-request-id"].startswith("req_") and r.json()["request_id"] == r.headers["x-request-id"]


def test_generated_request_ids_are_valid_and_unique(client):
    ids = [client.get("/health").headers["x-request-id"] for _ in range(20)]
    ids += [chat(client, max_tokens=1).headers["x-request-id"] for _ in range(3)]
    assert len(set(ids)) == len(ids) and all(VALID.match(i) for i in ids)


def test_the_request_id_is_in_the_log_lines_written_for_the_request(client):
    class Capture(logging.Handler):
        def __init__(self):
            super().__init__()
            self.records: list[logging.LogRecord] = []
            self.addFilter(RequestIdFilter())  # as app.lifecycle.configure_logging sets it up

        def emit(self, record):
            self.records.append(record)

    logger, capture = logging.getLogger("mmserve"), Capture()
    level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        assert chat(client, headers={"x-request-id": "trace-77"}, user="end-user-9").status_code == 200
        assert client.post("/v1/embeddings", json={"input": "x", "user": "end-user-10"},
                           headers={"x-request-id": "trace-78"}).status_code == 200
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
    lines = {(r.request_id, r.getMessage()) for r in capture.records}
    assert ("trace-77", "end user: 'end-user-9'") in lines and ("trace-78", "end user: 'end-user-10'") in lines


# -- the official client ---------------------------------------------------------------------------------
# The `openai` client, unchanged, over the test client's transport (tests/test_e2e_models.py and
# tests/test_batches_e2e.py run it against a real server on loopback), with its strict response validation
# on: each answer must parse as the client's own types, generated from OpenAI's schema, not merely be
# constructed from whatever arrived.
TRACE = {"x-request-id": "trace-client-1"}


@pytest.fixture(scope="module")
def openai_client(demo_runtime, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("client"))
    with TestClient(create_app(settings, demo_runtime)) as c:
        yield OpenAI(base_url=f"{c.base_url}/v1", api_key="unused", http_client=c, max_retries=0,
                     _strict_response_validation=True)


def test_the_openai_client_parses_models(openai_client):
    [model] = openai_client.models.list().data
    assert model.object == "model" and openai_client.models.retrieve(model.id).id == model.id
    with pytest.raises(NotFoundError) as e:
        openai_client.models.retrieve("gpt-9", extra_headers=TRACE)
    assert e.value.request_id == "trace-client-1" and e.value.code == "model_not_found"


def test_the_openai_client_parses_a_completion_and_its_stream(openai_client):
    raw = openai_client.chat.completions.with_raw_response.create(
        model="mmserve-demo", max_tokens=4, messages=[{"role": "user", "content": [IMAGE]}], extra_headers=TRACE)
    assert raw.headers["x-request-id"] == "trace-client-1"
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.message.refusal is None and choice.logprobs is None and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 4
    chunks = list(openai_client.chat.completions.create(model="mmserve-demo", max_tokens=4, stream=True,
                                                        stream_options={"include_usage": True},
                                                        messages=[{"role": "user", "content": [IMAGE]}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == 4


def test_the_openai_client_reads_a_refusal_by_name(openai_client):
    with pytest.raises(BadRequestError) as e:
        openai_client.chat.completions.create(model="mmserve-demo", messages=[{"role": "user", "content": [IMAGE]}],
                                              functions=[{"name": "lookup", "parameters": {}}], extra_headers=TRACE)
    assert (e.value.code, e.value.param, e.value.request_id) == ("unsupported_parameter", "functions", "trace-client-1")


def test_the_openai_client_parses_embeddings(openai_client):
    # float: the client's strict validation types `embedding` as a list, so its own default (base64 on the
    # wire, decoded after validation) cannot pass it, against any server; tests/test_embeddings.py runs that path.
    result = openai_client.embeddings.create(model="mmserve-demo", input=["a red circle", URL],
                                             encoding_format="float")
    assert [d.index for d in result.data] == [0, 1] and len(result.data[0].embedding) > 1
    assert result.usage.prompt_tokens > 0


def test_the_openai_client_parses_files_and_batches(openai_client):
    line = {"custom_id": "line", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "mmserve-demo", "max_tokens": 2, "messages": [{"role": "user", "content": [IMAGE]}]}}
    lines = "\n".join(json.dumps({**line, "custom_id": f"line-{i}"}) for i in range(50)).encode()
    uploaded = openai_client.files.create(file=("in.jsonl", lines), purpose="batch")
    assert openai_client.files.retrieve(uploaded.id).status == "processed"
    assert [f.id for f in openai_client.files.list().data] == [uploaded.id]
    assert [f.id for f in openai_client.files.list(purpose="batch", order="asc", limit=5)] == [uploaded.id]
    batch = openai_client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                         completion_window="24h", metadata={"owner": "client"})
    assert openai_client.batches.retrieve(batch.id).metadata == {"owner": "client"}
    assert [b.id for b in openai_client.batches.list().data] == [batch.id]
    cancelled = openai_client.batches.cancel(batch.id)  # 50 lines take seconds: it is still running
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at is not None
    with pytest.raises(BadRequestError) as e:
        openai_client.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch",
                                   expires_after={"anchor": "created_at", "seconds": 3600})
    assert e.value.param == "expires_after"
