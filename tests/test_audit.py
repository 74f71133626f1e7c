"""The audit log on its own: the hash chain, what `verify` catches, rotation, torn lines, processes."""

from __future__ import annotations

import json
import multiprocessing
import os

from app.tenancy.audit import AuditLog, rotated_files, verify


def _write(path, n, tag):
    log = AuditLog(path, max_bytes=4096)
    for i in range(n):
        log.write({"kind": "request", "writer": tag, "i": i})


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


def test_a_clean_chain_verifies(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    hashes = [log.write({"kind": "request", "i": i}) for i in range(5)]
    result = verify(tmp_path / "audit.jsonl")
    assert result.ok and result.records == 5 and result.last_hash == hashes[-1]
    records = [json.loads(line) for line in _lines(tmp_path / "audit.jsonl")]
    assert [r["seq"] for r in records] == list(range(5))
    assert all(b["prev"] == a["hash"] for a, b in zip(records, records[1:]))


def test_verify_catches_a_changed_a_removed_and_a_reordered_record(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(6):
        log.write({"kind": "request", "status": 200, "i": i})
    original = _lines(path)

    path.write_bytes(b"".join(original[:2] + [original[2].replace(b'"status":200', b'"status":201')] + original[3:]))
    result = verify(path)
    assert not result.ok and any("seq 2 was changed" in p for p in result.problems)

    path.write_bytes(b"".join(original[:3] + original[4:]))
    assert any("seq 4 does not follow seq 2" in p for p in verify(path).problems)

    path.write_bytes(b"".join(original[:2] + [original[3], original[2]] + original[4:]))
    assert not verify(path).ok


def test_the_chain_goes_on_across_rotated_files_and_a_missing_middle_file_is_caught(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=600)
    for i in range(20):
        log.write({"kind": "request", "i": i, "pad": "x" * 40})
    older = rotated_files(path)
    assert len(older) >= 3
    result = verify(path)
    assert result.ok and result.records == 20, result.problems
    older[1].unlink()
    assert not verify(path).ok
    # The oldest files removed (retention) leave a chain that verifies, starting later, and says so.
    for p in older[:2]:
        p.unlink(missing_ok=True)
    result = verify(path)
    assert result.ok and result.first_seq > 0 and "starts at seq" in result.notes[0]


def test_a_torn_last_line_is_repaired_and_the_chain_continues(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.write({"kind": "request", "i": i})
    with open(path, "ab") as f:  # what kill -9 in the middle of a write leaves
        f.write(b'{"kind":"request","i":3,"pr')
    assert verify(path).ok and "not yet repaired" in verify(path).notes[0]
    log = AuditLog(path)  # a restart repairs it
    log.write({"kind": "request", "i": 4})
    result = verify(path)
    assert result.ok and result.records == 5, result.problems  # 3 + the torn_line record + 1
    kinds = [json.loads(line)["kind"] for line in _lines(path) if line.startswith(b'{"') and line.endswith(b"}\n")
             and b'"hash"' in line]
    assert kinds == ["request"] * 3 + ["torn_line", "request"]
    # A second unreadable line that no torn_line record accounts for is caught.
    content = path.read_bytes()
    path.write_bytes(content.replace(b'{"kind":"request","i":3,"pr\n', b'{"kind":"request","i":3,"pr\nxx\n'))
    assert not verify(path).ok


def test_a_whole_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "audit.jsonl"
    AuditLog(path).write({"kind": "request"})
    path.write_bytes(path.read_bytes()[:-1])
    AuditLog(path).write({"kind": "request"})
    result = verify(path)
    assert result.ok and result.records == 2 and not result.notes


def test_two_processes_share_one_chain_with_rotation(tmp_path):
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_write, args=(path, 60, tag)) for tag in ("a", "b")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    result = verify(path)
    assert result.ok and result.records == 120, result.problems
    assert rotated_files(path) and os.path.getsize(path) <= 4096


def test_mmserve_audit_verify_exits_1_on_a_tampered_file(tmp_path, capsys):
    from app.cli import main

    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for i in range(3):
        log.write({"kind": "request", "i": i})
    assert main(["audit", "verify", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: 3 records")
    path.write_bytes(path.read_bytes().replace(b'"i":1', b'"i":7'))
    assert main(["audit", "verify", str(path)]) == 1
    assert "seq 1 was changed" in capsys.readouterr().out


def test_content_is_recorded_when_the_setting_asks(demo_runtime, tmp_path):
    """(Off by default: test_tenancy_e2e finds no image and no key in any record.)"""
    from litestar.testing import TestClient

    from app.server import create_app
    from app.settings import Settings
    from tests.slow_server import image_url

    with TestClient(create_app(Settings(data_dir=tmp_path, audit_content=True), demo_runtime)) as client:
        assert client.post("/v1/embeddings", json={"input": ["a red circle", image_url()]}).status_code == 200
    (record,) = [json.loads(line) for line in _lines(tmp_path / "audit" / "audit.jsonl")]
    assert record["route"] == "/v1/embeddings" and record["images"] == 1 and record["prompt_tokens"] > 0
    assert record["content"]["input"] == ["a red circle", image_url()]
