"""The Files and Batches API through the real app (litestar's test client) on the bundled demo model."""

from __future__ import annotations

import json
import random
import time

import pytest
from litestar.testing import TestClient

from app.server import create_app
from app.settings import Settings
from demo import world
from tests.conftest import data_url

MAX_FILE_BYTES = 100_000
SCENES = [world.sample_scene(random.Random(seed)) for seed in range(6)]


def request_line(custom_id: str, body: dict | None = None, **fields) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", **fields,
            "body": body if body is not None else {"model": "mmserve-demo", "messages": []}}


def caption_body(scene: world.Scene, **extra) -> dict:
    return {"model": "mmserve-demo", **extra, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(world.render(scene))}},
                                     {"type": "text", "text": "describe the image."}]}]}


def jsonl(lines: list) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode() + b"\n"


@pytest.fixture(scope="module")
def client(demo_runtime, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("batch-data"), max_file_bytes=MAX_FILE_BYTES,
                        max_batch_requests=20, batch_concurrency=3)
    with TestClient(create_app(settings, demo_runtime)) as c:
        yield c


def upload(client, content: bytes, purpose: str = "batch", filename: str = "requests.jsonl"):
    return client.post("/v1/files", files={"file": (filename, content, "application/jsonl")}, data={"purpose": purpose})


def start_batch(client, file_id: str, **extra) -> dict:
    r = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h", **extra})
    assert r.status_code == 200, r.text
    return r.json()


def wait_until_final(client, batch_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "cancelled"):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {batch['status']} after {timeout_s} s: {batch}")


def file_lines(client, file_id: str) -> list[dict]:
    r = client.get(f"/v1/files/{file_id}/content")
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def test_batch_captions_every_line_and_reports_bad_requests_as_error_lines(client):
    good = [request_line(f"scene-{i}", caption_body(scene)) for i, scene in enumerate(SCENES)]
    bad = [request_line("no-image", {"messages": [{"role": "user", "content": "hello"}]}),
           request_line("wrong-model", {**caption_body(SCENES[0]), "model": "gpt-9"}),
           request_line("not-an-image", {"messages": [{"role": "user", "content": [
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}}]}]})]
    content = jsonl(good[:3] + bad[:1] + good[3:] + bad[1:])
    r = upload(client, content)
    assert r.status_code == 200, r.text
    file = r.json()
    assert file["object"] == "file" and file["purpose"] == "batch" and file["bytes"] == len(content)
    assert file["filename"] == "requests.jsonl"
    assert client.get(f"/v1/files/{file['id']}").json() == file
    assert client.get(f"/v1/files/{file['id']}/content").content == content

    created = start_batch(client, file["id"], metadata={"job": "captions"})
    assert created["object"] == "batch" and created["status"] == "validating"
    assert created["metadata"] == {"job": "captions"} and created["input_file_id"] == file["id"]
    batch = wait_until_final(client, created["id"])
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 9, "completed": 6, "failed": 3}
    assert batch["completed_at"] >= batch["in_progress_at"] >= batch["created_at"]

    output = file_lines(client, batch["output_file_id"])
    assert [line["custom_id"] for line in output] == [f"scene-{i}" for i in range(len(SCENES))]
    for line, scene in zip(output, SCENES):
        assert line["error"] is None and line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == world.caption(scene)

    errors = {line["custom_id"]: line for line in file_lines(client, batch["error_file_id"])}
    assert set(errors) == {"no-image", "wrong-model", "not-an-image"}
    expected = {"no-image": (400, "no image"), "wrong-model": (404, "gpt-9"), "not-an-image": (400, "not an image")}
    for custom_id, (status, needle) in expected.items():
        response = errors[custom_id]["response"]
        assert response["status_code"] == status
        assert set(response["body"]["error"]) == {"message", "type", "param", "code"}
        assert needle in response["body"]["error"]["message"]
    assert client.get(f"/v1/files/{batch['output_file_id']}").json()["purpose"] == "batch_output"


BAD_FILES = [
    ("not json", [request_line("a"), "{nope"], "line 2"),
    ("not an object", [request_line("a"), request_line("b"), "[1, 2]"], "line 3"),
    ("duplicate custom_id", [request_line("a"), request_line("b"), request_line("a")],
     "line 3: custom_id 'a' is already used on line 1"),
    ("wrong url", [request_line("a", url="/v1/embeddings")], "line 1: url must be '/v1/chat/completions'"),
    ("wrong method", [request_line("a"), request_line("b", method="GET")], "line 2: method must be POST"),
    ("empty custom_id", [request_line("")], "line 1: custom_id must not be empty"),
    ("missing body", [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}], "line 1"),
    ("body not a chat request", [request_line("a", {"messages": "hi"})],
     "line 1: body is not a chat completion request"),
    ("stream", [request_line("a", {"messages": [], "stream": True})], "line 1: body.stream must be false"),
    ("no requests", ["", "  "], "holds no requests"),
    ("over max_batch_requests", [request_line(f"r{i}") for i in range(21)], "line 21: the file holds more than 20"),
]


@pytest.mark.parametrize("name,lines,needle", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_input_file_is_refused_naming_the_line(client, name, lines, needle):
    r = upload(client, jsonl(lines))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"], error
    assert error["code"] == "invalid_input_file" and error["param"] == "file"


def test_blank_lines_are_skipped_and_line_numbers_count_them(client):
    r = upload(client, jsonl([request_line("a"), "", request_line("a")]))
    assert "line 3: custom_id 'a' is already used on line 1" in r.json()["error"]["message"]


def test_upload_limits_and_purpose(client):
    r = upload(client, jsonl([request_line("a")]), purpose="fine-tune")
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    over_setting = jsonl([request_line("a", {"messages": [], "user": "x" * (MAX_FILE_BYTES + 10)})])
    r = upload(client, over_setting)  # over max_file_bytes, under the route's body cap
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "file_too_large" and str(MAX_FILE_BYTES) in r.json()["error"]["message"]
    r = upload(client, b"x" * (MAX_FILE_BYTES * 3))  # over the body cap: refused before it is read
    assert r.status_code == 413 and "error" in r.json()


def test_create_batch_validation(client):
    file_id = upload(client, jsonl([request_line("a", caption_body(SCENES[0]))])).json()["id"]
    cases = [({"input_file_id": "file-nope"}, 404, "file-nope"),
             ({"input_file_id": file_id, "endpoint": "/v1/embeddings"}, 400, "endpoint must be"),
             ({"input_file_id": file_id, "completion_window": "1h"}, 400, "completion_window must be '24h'"),
             ({"input_file_id": file_id, "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "at most 16")]
    for fields, status, needle in cases:
        body = {"endpoint": "/v1/chat/completions", "completion_window": "24h", **fields}
        r = client.post("/v1/batches", json=body)
        assert r.status_code == status, (fields, r.text)
        assert needle in r.json()["error"]["message"]
    r = client.post("/v1/batches", json={"input_file_id": file_id})
    assert r.status_code == 400 and "error" in r.json()  # endpoint and completion_window are required
    done = wait_until_final(client, start_batch(client, file_id)["id"])
    r = client.post("/v1/batches", json={"input_file_id": done["output_file_id"], "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h"})
    assert r.status_code == 400 and "purpose 'batch_output'" in r.json()["error"]["message"]


def test_unknown_ids_are_404_in_openai_shape(client):
    for path in ("/v1/files/file-nope", "/v1/files/file-nope/content", "/v1/batches/batch_nope"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error", path
    assert client.post("/v1/batches/batch_nope/cancel").status_code == 404


def test_list_pages_newest_first_and_finished_batches_cannot_be_cancelled(client):
    file_id = upload(client, jsonl([request_line("a", caption_body(SCENES[1]))])).json()["id"]
    ids = [start_batch(client, file_id)["id"] for _ in range(3)]
    for batch_id in ids:
        wait_until_final(client, batch_id)
    first = client.get("/v1/batches", params={"limit": 2}).json()
    assert first["object"] == "list" and [b["id"] for b in first["data"]] == ids[::-1][:2] and first["has_more"]
    second = client.get("/v1/batches", params={"limit": 2, "after": first["last_id"]}).json()
    assert second["data"][0]["id"] == ids[0]
    assert client.get("/v1/batches", params={"limit": 0}).status_code == 400
    r = client.post(f"/v1/batches/{ids[0]}/cancel")
    assert r.status_code == 409 and "completed" in r.json()["error"]["message"]


def test_files_and_batches_are_in_the_openapi_schema(client):
    paths = client.get("/schema/openapi.json").json()["paths"]
    for path in ("/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/batches",
                 "/v1/batches/{batch_id}", "/v1/batches/{batch_id}/cancel"):
        assert path in paths, path


def test_unwritable_data_dir_leaves_chat_up_and_batches_503(demo_runtime, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with TestClient(create_app(Settings(data_dir=blocker / "data"), demo_runtime)) as c:
        r = c.get("/v1/batches")
        assert r.status_code == 503 and r.json()["error"]["code"] == "batch_storage_unavailable"
        assert str(blocker / "data") in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200
