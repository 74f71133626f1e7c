"""Tenants, scopes, persisted quotas and the audit log through real server processes on loopback.

Two worker processes (A and B) serve one data directory, as a host's workers do: one key store, one
usage database, one audit log. Then A is killed with SIGKILL while requests are being charged and
audited, and restarted: nothing is lost or counted twice, and `mmserve audit verify` passes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.tenancy.audit import rotated_files, verify
from app.tenancy.keys import KeyStore
from app.tenancy.principal import Limits
from tests.test_batches_e2e import FINAL, free_port

MMSERVE = str(Path(sys.executable).parent / "mmserve")
ALL = frozenset({"chat", "embeddings", "batches"})


def png(colour=(200, 40, 40), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_body(raw: bytes, **extra) -> dict:
    return {"model": "mmserve-demo", "max_tokens": 6,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(raw)}}]}],
            **extra}


def launch(data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MMSERVE_THREADS": "1", "MMSERVE_DATA_DIR": str(data_dir), "MMSERVE_RATE_LIMIT_RPM": "0",
           "MMSERVE_AUDIT_MAX_BYTES": "16384", "MMSERVE_BATCH_CONCURRENCY": "1"}
    proc = subprocess.Popen([MMSERVE, "serve", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_up(proc: subprocess.Popen, base: str) -> None:
    deadline = time.monotonic() + 600  # a long while: this machine is shared, and two start at once
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"server at {base} did not come up")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()  # nothing to drain here; a SIGTERM drain would wait for the warm-up
        proc.wait(timeout=30)


class Servers:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.audit = data_dir / "audit" / "audit.jsonl"
        store = KeyStore(data_dir / "keys.sqlite3")
        self.keys, self.ids = {}, {}
        for name, tenant, scopes, limits in (
                ("admin", "ops", ALL | {"admin"}, Limits()),
                ("alpha", "alpha", ALL, Limits()),
                ("beta", "beta", ALL, Limits()),
                ("capped", "gamma", frozenset({"embeddings"}), Limits(requests_per_day=6)),
                ("meter", "delta", ALL, Limits()),
                ("loaded", "epsilon", ALL, Limits())):
            key, info = store.add(tenant, scopes, limits=limits, name=name)
            self.keys[name], self.ids[name] = key, info.id
        store.close()
        (self.a, self.base_a), (self.b, self.base_b) = launch(data_dir), launch(data_dir)
        wait_up(self.a, self.base_a)
        wait_up(self.b, self.base_b)

    def h(self, name: str) -> dict[str, str]:
        return bearer(self.keys[name])

    def records(self) -> list[dict]:
        out = []
        for path in [*rotated_files(self.audit), self.audit]:
            for line in path.read_bytes().splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a torn line (kill -9), accounted for by the record after it
        return out

    def usage(self, name: str, base: str | None = None) -> dict:
        r = httpx.get(f"{base or self.base_a}/v1/usage", headers=self.h("admin"), params={"key_id": self.ids[name]})
        assert r.status_code == 200, r.text
        return r.json()["day"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    s = Servers(tmp_path_factory.mktemp("tenancy"))
    try:
        yield s
    finally:
        stop(s.a)
        stop(s.b)


def wait_batch(base: str, key: str, batch_id: str) -> dict:
    deadline = time.monotonic() + 120
    while (batch := httpx.get(f"{base}/v1/batches/{batch_id}", headers=bearer(key)).json())["status"] not in FINAL:
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    return batch


def upload_batch(base: str, key: str, lines: list[dict]) -> tuple[str, str]:
    content = "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                    "body": body}) for i, body in enumerate(lines)).encode() + b"\n"
    file_id = httpx.post(f"{base}/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"},
                         headers=bearer(key)).json()["id"]
    r = httpx.post(f"{base}/v1/batches", headers=bearer(key),
                   json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert r.status_code == 200, r.text
    return file_id, r.json()["id"]


# -- tenants ---------------------------------------------------------------------------------------------
def test_one_tenant_cannot_see_read_cancel_or_guess_anothers_batch_and_file(servers):
    s = servers
    file_id, batch_id = upload_batch(s.base_a, s.keys["alpha"], [chat_body(png())])
    made_up_file, made_up_batch = f"file-{uuid.uuid4().hex}", f"batch_{uuid.uuid4().hex}"
    for base in (s.base_a, s.base_b):  # both workers: one store
        beta = {"headers": s.h("beta")}
        for path, code in ((f"/v1/files/{file_id}", "file_not_found"), (f"/v1/files/{file_id}/content", "file_not_found"),
                           (f"/v1/files/{made_up_file}", "file_not_found"), (f"/v1/batches/{batch_id}", "batch_not_found"),
                           (f"/v1/batches/{made_up_batch}", "batch_not_found")):
            r = httpx.get(base + path, **beta)
            assert r.status_code == 404 and r.json()["error"]["code"] == code, (path, r.text)
        theirs = httpx.post(f"{base}/v1/batches/{batch_id}/cancel", **beta)
        guessed = httpx.post(f"{base}/v1/batches/{made_up_batch}/cancel", **beta)
        assert theirs.status_code == guessed.status_code == 404
        assert theirs.json()["error"]["code"] == guessed.json()["error"]["code"] == "batch_not_found"
        assert file_id not in {f["id"] for f in httpx.get(f"{base}/v1/files", **beta).json()["data"]}
        assert batch_id not in {b["id"] for b in httpx.get(f"{base}/v1/batches", **beta).json()["data"]}
        r = httpx.post(f"{base}/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                   "completion_window": "24h"}, **beta)
        assert r.status_code == 404 and r.json()["error"]["param"] == "input_file_id"
        # The owner sees both, from either worker.
        assert httpx.get(f"{base}/v1/files/{file_id}", headers=s.h("alpha")).status_code == 200
        assert batch_id in {b["id"] for b in httpx.get(f"{base}/v1/batches", headers=s.h("alpha")).json()["data"]}
    batch = wait_batch(s.base_b, s.keys["alpha"], batch_id)
    assert batch["status"] == "completed", batch
    out = batch["output_file_id"]
    assert httpx.get(f"{s.base_a}/v1/files/{out}/content", headers=s.h("alpha")).status_code == 200
    assert httpx.get(f"{s.base_a}/v1/files/{out}/content", headers=s.h("beta")).status_code == 404


def test_a_revoked_key_is_refused_at_once_by_every_worker_and_scopes_hold(servers):
    s = servers
    made = httpx.post(f"{s.base_a}/v1/admin/keys", headers=s.h("admin"),
                      json={"tenant": "zeta", "scopes": ["embeddings"], "name": "short-lived"})
    assert made.status_code == 200, made.text
    key, key_id = made.json()["key"], made.json()["id"]
    assert key not in s.records().__repr__()  # never in clear in the audit
    assert httpx.post(f"{s.base_b}/v1/embeddings", headers=bearer(key), json={"input": "a red circle"}).status_code == 200
    chat = httpx.post(f"{s.base_b}/v1/chat/completions", headers=bearer(key), json=chat_body(png()))
    assert chat.status_code == 403 and chat.json()["error"]["code"] == "insufficient_scope"
    assert httpx.get(f"{s.base_b}/v1/admin/keys", headers=bearer(key)).status_code == 403
    listed = httpx.get(f"{s.base_b}/v1/admin/keys", headers=s.h("admin")).json()["data"]
    assert key_id in {k["id"] for k in listed} and all(k["key"] is None for k in listed)
    assert httpx.post(f"{s.base_a}/v1/admin/keys/{key_id}/revoke", headers=s.h("admin")).json()["revoked_at"]
    refused = httpx.post(f"{s.base_b}/v1/embeddings", headers=bearer(key), json={"input": "a red circle"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert key.encode() not in (s.data_dir / "keys.sqlite3").read_bytes()  # only its hash at rest


def test_a_quota_holds_across_two_worker_processes(servers):
    s = servers
    codes = []
    for i in range(8):  # limit 6 requests per day, alternating workers
        r = httpx.post(f"{(s.base_a, s.base_b)[i % 2]}/v1/embeddings", headers=s.h("capped"),
                       json={"input": "a red circle"})
        codes.append(r.status_code)
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "insufficient_quota" and 0 < int(r.headers["retry-after"]) <= 86_400
    assert codes == [200] * 6 + [429] * 2
    own = httpx.get(f"{s.base_b}/v1/usage", headers=s.h("capped")).json()  # readable over quota
    assert own["day"]["requests"] == 6 and own["limits"]["requests_per_day"] == 6
    assert httpx.get(f"{s.base_b}/v1/usage", headers=s.h("capped"),
                     params={"key_id": s.ids["alpha"]}).status_code == 403  # another key's: admin only


def test_every_route_is_charged_and_audited_with_the_chain_verified(servers):
    s = servers
    red, blue = png((200, 40, 40), (64, 48)), png((40, 40, 200), (32, 32))
    h = s.h("meter")
    chat = httpx.post(f"{s.base_a}/v1/chat/completions", headers=h, json=chat_body(red), timeout=60)
    assert chat.status_code == 200, chat.text
    with httpx.stream("POST", f"{s.base_b}/v1/chat/completions", headers=h, timeout=60,
                      json=chat_body(blue, stream=True, stream_options={"include_usage": True})) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    stream_usage = events[-1]["usage"]
    emb = httpx.post(f"{s.base_a}/v1/embeddings", headers=h, json={"input": ["a red circle", data_url(blue)]}).json()
    classify = httpx.post(f"{s.base_b}/v1/classify", headers=h, json={"image": data_url(red)})
    assert classify.status_code == 200
    _, batch_id = upload_batch(s.base_a, s.keys["meter"], [chat_body(blue)])
    batch = wait_batch(s.base_a, s.keys["meter"], batch_id)
    line = json.loads(httpx.get(f"{s.base_a}/v1/files/{batch['output_file_id']}/content", headers=h).text)
    line_usage = line["response"]["body"]["usage"]

    tokens = (chat.json()["usage"]["total_tokens"] + stream_usage["total_tokens"] + emb["usage"]["total_tokens"]
              + line_usage["total_tokens"])
    used = s.usage("meter")
    assert used == {"requests": 5, "tokens": tokens, "images": 5, "pixels": 2 * 64 * 48 + 3 * 32 * 32}, used

    mine = [r for r in s.records() if r.get("key_id") == s.ids["meter"]]
    by_route = {}
    for r in mine:
        by_route.setdefault((r["kind"], r["route"]), []).append(r)
    chats = by_route[("request", "/v1/chat/completions")]
    assert len(chats) == 2 and all(r["tenant"] == "delta" and r["status"] == 200 for r in chats)
    assert {r["image_digests"][0] for r in chats} == {hashlib.sha256(red).hexdigest(), hashlib.sha256(blue).hexdigest()}
    for r in chats:
        assert r["model"] == "mmserve-demo" and len(r["model_version"]) == 12 and r["router_route"]
        assert r["finish_reason"] in ("stop", "length") and r["ttft_ms"] is not None and r["latency_ms"] >= r["ttft_ms"]
        assert r["prompt_tokens"] + r["completion_tokens"] in (chat.json()["usage"]["total_tokens"],
                                                               stream_usage["total_tokens"])
    assert by_route[("request", "/v1/embeddings")][0]["prompt_tokens"] == emb["usage"]["total_tokens"]
    assert by_route[("request", "/v1/classify")][0]["pixels"] == 64 * 48
    (batch_line,) = by_route[("batch_line", "/v1/chat/completions")]
    assert batch_line["batch_id"] == batch_id and batch_line["custom_id"] == "line-0" and batch_line["status"] == 200
    assert ("request", "/v1/files") in by_route and ("request", "/v1/batches") in by_route
    text = json.dumps(mine)
    assert "data:image" not in text and s.keys["meter"] not in text  # no images, no keys
    assert chat.headers["x-request-id"] in {r["request_id"] for r in chats}

    result = verify(s.audit)
    assert result.ok and result.records >= len(mine), result.problems
    assert rotated_files(s.audit), "the test sets a small audit_max_bytes: the chain spans rotated files"
    # A tampered copy is caught by the CLI.
    copy = s.data_dir / "tampered.jsonl"
    lines = s.audit.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[len(lines) // 2])
    record["status"] = 200 if record["status"] != 200 else 201
    lines[len(lines) // 2] = json.dumps(record).encode() + b"\n"
    copy.write_bytes(b"".join(lines))
    cli = subprocess.run([MMSERVE, "audit", "verify", "--no-rotated", str(copy)], capture_output=True, text=True)
    assert cli.returncode == 1 and "was changed" in cli.stdout
    assert subprocess.run([MMSERVE, "audit", "verify", str(s.audit)], capture_output=True).returncode == 0


# -- path tricks -----------------------------------------------------------------------------------------
def raw_status(base: str, path: str, key: str | None = None) -> int:
    """Send the request line exactly as written (an HTTP client would normalise `..` and `//`)."""
    host, port = base.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode())
        head = sock.recv(64).decode("latin-1")
    return int(head.split(" ")[1])


PATH_TRICKS = ["/v1/models", "//v1/models", "/v1//models", "/v1/../v1/models", "/v1/./models", "/./v1/models",
               "/v1/%6dodels", "/%76%31/models", "/v1%2fmodels", "/V1/MODELS", "/V1/models", "/v1/models/",
               "/v1/models?x=1", "/nope", "/v1/nope", "/health/../v1/models", "/schema/../v1/models",
               "/metrics/../v1/usage", "/HEALTH", "/v1/usage", "/v1/admin/keys", "/%2e%2e/v1/models",
               "/v1/files/..%2f..%2fv1%2fmodels"]


@pytest.mark.parametrize("path", PATH_TRICKS)
def test_every_path_however_spelled_meets_the_key_check(servers, path):
    s = servers
    assert raw_status(s.base_a, path) == 401
    assert raw_status(s.base_a, path, "not-a-key") == 401
    assert raw_status(s.base_a, path, s.keys["alpha"]) != 401


def test_probes_stay_open_and_admin_paths_need_admin_however_spelled(servers):
    s = servers
    for path in ("/health", "/metrics"):
        assert raw_status(s.base_a, path) == 200
    for path in ("/v1/admin/keys", "/v1/admin/keys/", "/v1/%61dmin/keys"):
        assert raw_status(s.base_a, path, s.keys["alpha"]) in (403, 404), path


# -- kill -9 while charging and auditing -----------------------------------------------------------------
def test_kill_9_during_charging_and_audit_writes_loses_and_duplicates_nothing(servers):
    s = servers
    ok, sent, stop_at = [], [], threading.Event()

    def load(base: str) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop_at.is_set():
                sent.append(1)
                try:
                    r = client.post(f"{base}/v1/embeddings", headers=s.h("loaded"), json={"input": "a blue square"})
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    ok.append(r.headers["x-request-id"])

    threads = [threading.Thread(target=load, args=(s.base_a,)) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(ok) < 15 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.a.send_signal(signal.SIGKILL)
    s.a.wait(timeout=10)
    stop_at.set()
    for t in threads:
        t.join(30)
    assert len(ok) >= 15

    s.a, s.base_a = launch(s.data_dir)  # restart on the same data dir
    wait_up(s.a, s.base_a)
    result = verify(s.audit)
    assert result.ok, result.problems
    audited = [r for r in s.records() if r.get("key_id") == s.ids["loaded"] and r["status"] == 200]
    ids = [r["request_id"] for r in audited]
    assert len(ids) == len(set(ids)), "a request audited twice"
    assert set(ok) <= set(ids), "an answered request has no audit record"
    assert len(ids) <= len(ok) + len(threads)  # at most the requests in flight at the kill
    used = s.usage("loaded")
    # Every answered request counted once; in flight at the kill: counted or not, never twice.
    assert len(ok) <= used["requests"] <= len(ok) + len(threads), (used, len(ok))
    per_request = used["tokens"] // max(1, len(audited))
    assert abs(used["tokens"] - sum(r["prompt_tokens"] for r in audited)) <= len(threads) * per_request
    # The quota that held before the restart still holds.
    r = httpx.post(f"{s.base_a}/v1/embeddings", headers=s.h("capped"), json={"input": "a red circle"})
    assert r.status_code == 429
    # The log goes on after the restart and still verifies.
    assert httpx.get(f"{s.base_a}/v1/models", headers=s.h("alpha")).status_code == 200
    assert verify(s.audit).ok
