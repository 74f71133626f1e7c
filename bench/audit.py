"""What tenancy costs each request: the audit record, the quota, the key lookup.

    python -m bench.audit [--quick]

Per request, timed one call at a time (p50 and p99 in microseconds), on a temporary directory:
  audit write          AuditLog.write of a typical chat record: file lock, tail check, hash, one append
  audit write, 2 procs the same with a second process writing to the same log at full speed
  audit write + fsync  audit_fsync=true (survives a power cut, not only a killed process)
  peer: plain append   json.dumps + write + flush to an open file: what an unchained, unlocked
                       JSONL logger costs (the floor the chain and the lock are measured against)
  quota admit          QuotaStore.admit: one BEGIN IMMEDIATE transaction (check and count a request)
  key lookup           Keys.identify of a store key: SHA-256 + one indexed SELECT
  finish               Finalizer.finish: quota charge + audit write, what every request ends with
  tenancy total        key lookup + quota admit + finish: the whole per-request overhead

Target (issue 14): audit overhead per request p50 <= 1 ms.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.report import command_line, publish, table
from app.tenancy.audit import AuditLog, verify
from app.tenancy.finalize import Finalizer
from app.tenancy.keys import Keys, KeyStore
from app.tenancy.principal import Limits
from app.tenancy.quotas import QuotaStore
from app.tenancy.record import RequestRecord


def typical_record(principal) -> RequestRecord:
    record = RequestRecord("request", "req_" + "0" * 32, "POST", "/v1/chat/completions", principal,
                           route="/v1/chat/completions", status=200)
    record.routed("mmserve-demo", "55ef8afb9060", "decoder:mmserve-demo", "caption request: the small model")
    record.image("c7080c8eeda2577ba1c7f04b54fd2f19d50f0d13b503ed3e08d801aed24c8591", 4096)
    record.first_token()
    record.finished(19, 6, "stop")
    return record


def timed(fn, n: int) -> dict:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return {"n": n, "p50_us": statistics.median(samples), "p99_us": samples[int(0.99 * (n - 1))],
            "mean_us": statistics.fmean(samples)}


def _hammer(path: str, stop_at: float) -> None:
    log = AuditLog(path)
    while time.time() < stop_at:
        log.write({"kind": "request", "route": "/v1/embeddings", "status": 200})


def run(n: int) -> tuple[list[dict], dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = KeyStore(tmp / "keys.sqlite3")
        key, _ = store.add("bench", frozenset({"chat"}), limits=Limits(requests_per_day=10**9))
        keys = Keys(frozenset(), store, Limits())
        principal = keys.identify(f"Bearer {key}")
        quotas = QuotaStore(tmp / "usage.sqlite3")
        record = typical_record(principal)
        body = record.audit()

        log = AuditLog(tmp / "audit.jsonl")
        rows.append({"step": "audit write", **timed(lambda: log.write(body), n)})

        stop_at = time.time() + 3600
        ctx = multiprocessing.get_context("fork")
        other = ctx.Process(target=_hammer, args=(str(tmp / "audit.jsonl"), stop_at))
        other.start()
        time.sleep(0.2)
        rows.append({"step": "audit write, 2 procs", **timed(lambda: log.write(body), n)})
        other.kill()
        other.join()

        synced = AuditLog(tmp / "synced.jsonl", fsync=True)
        rows.append({"step": "audit write + fsync", **timed(lambda: synced.write(body), max(50, n // 10))})

        with open(tmp / "plain.jsonl", "a") as plain:
            def append() -> None:
                plain.write(json.dumps(body) + "\n")
                plain.flush()
            rows.append({"step": "peer: plain append", **timed(append, n)})

        rows.append({"step": "quota admit", **timed(lambda: quotas.admit(principal), n)})
        rows.append({"step": "key lookup", **timed(lambda: keys.identify(f"Bearer {key}"), n)})
        finalizer = Finalizer(quotas, AuditLog(tmp / "finish.jsonl"))

        def finish() -> None:
            fresh = typical_record(principal)
            finalizer.finish(fresh)
        rows.append({"step": "finish", **timed(finish, n)})

        def total() -> None:
            p = keys.identify(f"Bearer {key}")
            quotas.admit(p)
            finalizer.finish(typical_record(p))
        rows.append({"step": "tenancy total", **timed(total, n)})
        chain = verify(tmp / "audit.jsonl")
        assert chain.ok, chain.problems
        checks = {"chain_ok_after_contention": chain.ok, "records": chain.records}
    return rows, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1000 calls per step instead of 5000")
    args = parser.parse_args()
    n = 1000 if args.quick else 5000
    rows, checks = run(n)
    by = {r["step"]: r for r in rows}
    summary = {"audit_write_p50_us": round(by["audit write"]["p50_us"], 1),
               "audit_write_2procs_p50_us": round(by["audit write, 2 procs"]["p50_us"], 1),
               "finish_p50_us": round(by["finish"]["p50_us"], 1),
               "tenancy_total_p50_us": round(by["tenancy total"]["p50_us"], 1),
               "audit_vs_plain_append": round(by["audit write"]["p50_us"] / by["peer: plain append"]["p50_us"], 2),
               "target_met": by["finish"]["p50_us"] <= 1000.0, "calls": n, "quick": args.quick, **checks}
    publish("audit", command_line(), summary,
            [("per-request tenancy costs, one call at a time (machine shared: absolutes noisy)",
              table(rows, ["step", "n", "p50_us", "p99_us", "mean_us"]))],
            details={"rows": rows})


if __name__ == "__main__":
    sys.exit(main())
