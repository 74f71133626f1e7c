"""The batch worker and store on their own: a real SQLite store and worker, a scripted chat service in
place of the model, so concurrency, cancel, restart and failure paths are exact and fast."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest

from app.batches.schemas import CreateBatchRequest
from app.batches.service import BatchService
from app.batches.store import BatchStore
from app.errors import APIError
from app.chat.schemas import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, Usage
from app.settings import Settings


class ScriptedChat:
    """Answers "say X" with X. A request whose text starts with "bad" is refused (400), "boom" raises an
    unexpected error, "vanish" is cancelled from inside. Requests wait at `gate` until it opens, and those
    `hang` picks wait for ever; `active` and `peak` count requests in flight."""

    def __init__(self, prefix: str = "", open_gate: bool = True, hang: Callable[[str], bool] = lambda _: False) -> None:
        self.prefix, self.hang, self.seen, self.active, self.peak = prefix, hang, [], 0, 0
        self.gate = asyncio.Event()
        if open_gate:
            self.gate.set()

    async def complete(self, req: ChatCompletionRequest, observer=None, tenant=None) -> tuple[ChatCompletion, str]:
        text = req.messages[0].content
        self.seen.append(text)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.gate.wait()
            if self.hang(text):
                await asyncio.Event().wait()
            if text.startswith("bad"):
                raise APIError(400, f"refused: {text}", param="messages")
            if text.startswith("boom"):
                raise RuntimeError("the engine fell over")
            if text.startswith("vanish"):
                raise asyncio.CancelledError  # as an engine that aborts a request on its own might
            answer = Choice(0, AssistantMessage(self.prefix + text), "stop")
            return ChatCompletion("chatcmpl-x", 0, "scripted", [answer], Usage(1, 1, 2)), "decoder:scripted"
        finally:
            self.active -= 1


def input_file(texts: list[str]) -> bytes:
    return "\n".join(json.dumps({"custom_id": f"id-{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"messages": [{"role": "user", "content": t}]}})
                     for i, t in enumerate(texts)).encode()


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def until_status(service: BatchService, batch_id: str, statuses: tuple[str, ...]) -> dict:
    deadline = time.monotonic() + 10
    while (batch := await service.get_batch(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        await asyncio.sleep(0.005)
    return batch


async def submit(service: BatchService, texts: list[str]) -> str:
    file = await service.upload("in.jsonl", "batch", input_file(texts))
    batch = await service.create_batch(CreateBatchRequest(file.id, "/v1/chat/completions", "24h"))
    return batch.id


async def lines_of(service: BatchService, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in (await service.file_content(file_id)).splitlines()]


def settings(tmp_path, **extra) -> Settings:
    return Settings(data_dir=tmp_path, **extra)


def test_concurrency_is_bounded_and_bad_lines_become_error_lines(tmp_path):
    async def main():
        chat = ScriptedChat(open_gate=False)
        service = BatchService(settings(tmp_path, batch_concurrency=2), chat)
        await service.start()
        texts = ["say a", "bad one", "say b", "boom", "say c", "say d", "say e"]
        batch_id = await submit(service, texts)
        await until(lambda: chat.active == 2)
        await asyncio.sleep(0.05)  # give the worker every chance to start a third
        assert chat.active == 2
        chat.gate.set()
        batch = await until_status(service, batch_id, ("completed",))
        assert chat.peak == 2 and sorted(chat.seen) == sorted(texts)
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 5, 2)
        output = await lines_of(service, batch.output_file_id)
        assert [(l["custom_id"], l["response"]["body"]["choices"][0]["message"]["content"]) for l in output] == [
            ("id-0", "say a"), ("id-2", "say b"), ("id-4", "say c"), ("id-5", "say d"), ("id-6", "say e")]
        errors = {l["custom_id"]: l["response"] for l in await lines_of(service, batch.error_file_id)}
        assert errors["id-1"]["status_code"] == 400
        assert errors["id-1"]["body"]["error"]["message"] == "refused: bad one"
        assert errors["id-3"]["status_code"] == 500
        assert errors["id-3"]["body"]["error"] == {"message": "internal server error", "type": "server_error",
                                                   "param": None, "code": None}
        await service.stop()
    asyncio.run(main())


def test_a_request_cancelled_inside_the_chat_service_is_an_error_line_not_a_hole(tmp_path):
    async def main():
        service = BatchService(settings(tmp_path), ScriptedChat())
        await service.start()
        batch = await until_status(service, await submit(service, ["say a", "vanish", "say b"]), ("completed",))
        assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
        [error] = await lines_of(service, batch.error_file_id)
        assert error["custom_id"] == "id-1" and error["response"]["status_code"] == 503
        await service.stop()
    asyncio.run(main())


def test_cancel_keeps_lines_in_flight_and_never_runs_the_rest(tmp_path):
    async def main():
        chat = ScriptedChat(open_gate=False)
        service = BatchService(settings(tmp_path, batch_concurrency=2), chat)
        await service.start()
        batch_id = await submit(service, [f"say {i}" for i in range(10)])
        await until(lambda: chat.active == 2)
        assert (await service.cancel(batch_id)).status == "cancelling"
        chat.gate.set()
        batch = await until_status(service, batch_id, ("cancelled",))
        assert batch.cancelled_at is not None and batch.request_counts.completed == 2
        assert sorted(chat.seen) == ["say 0", "say 1"]
        output = await lines_of(service, batch.output_file_id)
        errors = await lines_of(service, batch.error_file_id)
        assert [l["custom_id"] for l in output] == ["id-0", "id-1"]
        assert [l["custom_id"] for l in errors] == [f"id-{i}" for i in range(2, 10)]
        assert all(l["response"] is None and l["error"]["code"] == "batch_cancelled" for l in errors)
        assert (await service.cancel(batch_id)).status == "cancelled"  # cancelling twice is harmless
        await service.stop()
    asyncio.run(main())


def test_a_restarted_worker_runs_only_the_lines_left_and_keeps_the_others(tmp_path):
    async def main():
        texts = [f"say {i}" for i in range(12)]
        # lines 6 on hang, like requests in a process about to die
        first = ScriptedChat(prefix="first: ", hang=lambda text: int(text.split()[1]) >= 6)
        service = BatchService(settings(tmp_path, batch_concurrency=3), first)
        await service.start()
        batch_id = await submit(service, texts)
        await until_status(service, batch_id, ("in_progress",))
        deadline = time.monotonic() + 10
        while (await service.get_batch(batch_id)).request_counts.completed < 6 or first.active < 3:
            assert time.monotonic() < deadline, "the first six lines were not answered in time"
            await asyncio.sleep(0.005)
        await service.stop()  # abandons the three lines in flight: they were never recorded
        answered = await lines_of_store(tmp_path, batch_id)
        assert answered == {f"id-{i}" for i in range(6)}

        second = ScriptedChat(prefix="second: ")
        service = BatchService(settings(tmp_path), second)
        await service.start()
        batch = await until_status(service, batch_id, ("completed",))
        output = await lines_of(service, batch.output_file_id)
        assert [l["custom_id"] for l in output] == [f"id-{i}" for i in range(12)]  # each once, in input order
        for line in output:
            text = line["response"]["body"]["choices"][0]["message"]["content"]
            owner = "first: " if line["custom_id"] in answered else "second: "
            assert text == owner + texts[int(line["custom_id"][3:])]
        assert sorted(second.seen) == sorted(t for i, t in enumerate(texts) if f"id-{i}" not in answered)
        await service.stop()
    asyncio.run(main())


async def lines_of_store(data_dir, batch_id: str) -> set[str]:
    store = BatchStore(data_dir / "batches.sqlite3")
    try:
        rows = store.conn.execute("SELECT custom_id FROM batch_lines WHERE batch_id = ? AND status_code IS NOT NULL",
                                  (batch_id,)).fetchall()
        return {r[0] for r in rows}
    finally:
        store.close()


def test_a_line_is_recorded_once_and_a_batch_finalized_once(tmp_path):
    from app.batches.input_file import parse_input_file

    store = BatchStore(tmp_path / "b.sqlite3")
    file = store.add_file("in.jsonl", "batch", input_file(["say a", "say b"]))
    batch = store.add_batch(CreateBatchRequest(file.id, "/v1/chat/completions", "24h"))
    assert store.start_batch(batch.id, parse_input_file(store.file_content(file.id), 10))
    assert store.record_line(batch.id, 1, 200, b'{"first": true}') == "in_progress"
    store.record_line(batch.id, 1, 500, b'{"second": true}')  # a rerun of an answered line changes nothing
    assert [line[0] for line in store.pending_lines(batch.id, 0, 10)] == [2]
    store.record_line(batch.id, 2, 400, b'{"error": true}')
    assert store.move(batch.id, ("in_progress",), "finalizing")
    assert store.finalize(batch.id, "finalizing", "completed")
    assert not store.finalize(batch.id, "finalizing", "completed")
    done = store.get_batch(batch.id)
    assert store.file_content(done.output_file_id) == b'{"first": true}\n'
    assert store.file_content(done.error_file_id) == b'{"error": true}\n'
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    store.close()


def test_a_batch_whose_file_fails_validation_at_run_time_is_failed(tmp_path):
    async def main():
        service = BatchService(settings(tmp_path), ScriptedChat())
        await service.start()
        file = await service.upload("in.jsonl", "batch", input_file(["say a", "say b", "say c"]))
        await service.stop()
        # a restart with a lower limit: the stored file is now over it
        service = BatchService(settings(tmp_path, max_batch_requests=2), ScriptedChat())
        await service.start()
        batch = await service.create_batch(CreateBatchRequest(file.id, "/v1/chat/completions", "24h"))
        batch = await until_status(service, batch.id, ("failed",))
        assert batch.failed_at is not None and batch.output_file_id is None
        [error] = batch.errors.data
        assert error.code == "invalid_input_file" and error.line == 3 and "more than 2" in error.message
        await service.stop()
    asyncio.run(main())


@pytest.mark.parametrize("name,value", [("max_file_bytes", 0), ("batch_concurrency", 0), ("max_batch_requests", 0)])
def test_batch_settings_must_be_positive(name, value):
    with pytest.raises(ValueError, match=name):
        Settings(**{name: value})


def test_batch_settings_from_environment(tmp_path):
    s = Settings.from_env({"MMSERVE_DATA_DIR": str(tmp_path), "MMSERVE_BATCH_CONCURRENCY": "7"})
    assert s.batch_db_path == tmp_path / "batches.sqlite3" and s.batch_concurrency == 7
    assert Settings.from_env({"MMSERVE_BATCH_DB": str(tmp_path / "x.db")}).batch_db_path == tmp_path / "x.db"
