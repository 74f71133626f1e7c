"""Workers in separate processes sharing one batch store: each batch is worked by one of them at a time,
and a worker killed with SIGKILL mid-batch leaves its batch to another at the lease's expiry, with every
line answered exactly once. Real processes, a real SQLite file, a scripted chat (tests/batch_worker_process.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.batches.input_file import parse_input_file
from app.batches.schemas import CreateBatchRequest
from app.batches.store import BatchStore, LeaseLost
from tests.test_batches_worker import input_file

ROOT = Path(__file__).resolve().parent.parent
LEASE_S, POLL_S = 1.0, 0.1


def start_worker(db: Path, owner: str, hold: Path, line_s: float = 0.02) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tests.batch_worker_process", str(db), owner, str(LEASE_S),
                             str(POLL_S), str(line_s), str(hold)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not in {timeout_s} s"
        time.sleep(0.02)


def answers(store: BatchStore, batch_id: str) -> dict[str, str]:
    """custom_id -> the answer's text, for the lines answered so far."""
    rows = store.conn.execute("SELECT custom_id, result FROM batch_lines WHERE batch_id = ? AND status_code IS NOT "
                              "NULL", (batch_id,)).fetchall()
    return {r[0]: json.loads(r[1])["response"]["body"]["choices"][0]["message"]["content"] for r in rows}


def add_batch(store: BatchStore, n: int) -> tuple[str, list[str]]:
    texts = [f"say {i}" for i in range(n)]
    file = store.add_file("in.jsonl", "batch", input_file(texts))
    return store.add_batch(CreateBatchRequest(file.id, "/v1/chat/completions", "24h")).id, texts


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_two_workers_take_one_batch_each_and_never_share_one(tmp_path):
    db, hold = tmp_path / "b.sqlite3", tmp_path / "hold"
    store = BatchStore(db)
    (first, texts), (second, _) = add_batch(store, 8), add_batch(store, 8)
    hold.touch()  # both workers stall on their first lines until both batches are leased
    a = start_worker(db, "A", hold)
    try:
        wait_for(lambda: store.lease_owner(first) == "A", "A leases the oldest batch")
        b = start_worker(db, "B", hold)
        try:
            wait_for(lambda: store.lease_owner(second) == "B", "B leases the batch A does not hold")
            assert store.lease_owner(first) == "A"
            hold.unlink()
            wait_for(lambda: all(store.get_batch(i).status == "completed" for i in (first, second)), "both complete")
        finally:
            stop(b)
    finally:
        stop(a)
    assert answers(store, first) == {f"id-{i}": f"A: {t}" for i, t in enumerate(texts)}
    assert answers(store, second) == {f"id-{i}": f"B: {t}" for i, t in enumerate(texts)}
    assert store.lease_owner(first) is None and store.lease_owner(second) is None  # given back when done
    store.close()


def test_a_worker_killed_mid_batch_is_taken_over_at_expiry_with_each_line_answered_once(tmp_path):
    db, hold = tmp_path / "b.sqlite3", tmp_path / "hold"
    store = BatchStore(db)
    batch_id, texts = add_batch(store, 30)
    a = start_worker(db, "A", hold)
    b = None
    try:
        wait_for(lambda: len(answers(store, batch_id)) >= 5, "A answers its first lines")
        hold.touch()  # A freezes with lines in flight, its heartbeat still beating
        time.sleep(0.1)
        before_kill = answers(store, batch_id)
        b = start_worker(db, "B", hold)
        time.sleep(1.5 * LEASE_S)  # a live owner keeps its batch: B takes nothing while A's lease is renewed
        assert store.lease_owner(batch_id) == "A" and answers(store, batch_id) == before_kill
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        hold.unlink()
        wait_for(lambda: store.get_batch(batch_id).status == "completed", "B completes the batch")
    finally:
        stop(*(p for p in (a, b) if p is not None))
    done = answers(store, batch_id)
    assert set(done) == {f"id-{i}" for i in range(30)}
    assert all(done[c] == f"A: {texts[int(c[3:])]}" for c in before_kill)
    assert all(done[c] == f"B: {texts[int(c[3:])]}" for c in set(done) - set(before_kill))
    batch = store.get_batch(batch_id)
    output = [json.loads(line) for line in store.file_content(batch.output_file_id).splitlines()]
    assert [line["custom_id"] for line in output] == [f"id-{i}" for i in range(30)]  # each once, in order
    assert batch.request_counts.completed == 30 and batch.error_file_id is None
    store.close()


def test_an_answer_from_a_worker_that_lost_its_lease_is_refused(tmp_path):
    store = BatchStore(tmp_path / "b.sqlite3")
    batch_id, _ = add_batch(store, 2)
    assert store.start_batch(batch_id, parse_input_file(store.file_content(store.get_batch(batch_id).input_file_id), 10))
    assert store.claim_batch("A", lease_s=-1)[1] is None  # already expired: free for the taking
    claimed, previous = store.claim_batch("B", lease_s=60)
    assert claimed.id == batch_id and previous == "A"
    assert store.claim_batch("A", lease_s=60) is None  # B holds it and is alive
    assert not store.renew_lease(batch_id, "A", 60)
    with pytest.raises(LeaseLost):
        store.record_line(batch_id, 1, 200, b'{"late": "A"}', owner="A")
    assert store.record_line(batch_id, 1, 200, b'{"x": "B"}', owner="B") == "in_progress"
    assert store.pending_lines(batch_id, 0, 10)[0][0] == 2
    store.close()


def test_a_lease_whose_owner_process_is_gone_from_this_host_is_free_at_once():
    import socket

    from app.batches.worker import gone_from_this_host, worker_id

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    assert gone_from_this_host(f"{host}:{done.stdout.strip()}:abcd1234")  # exited and reaped
    assert not gone_from_this_host(f"{host}:{os.getppid()}:abcd1234")  # alive
    assert not gone_from_this_host(worker_id())  # this very process
    assert not gone_from_this_host(f"{host}-elsewhere:{done.stdout.strip()}:abcd1234")  # another host: expiry only
    assert not gone_from_this_host("A")
