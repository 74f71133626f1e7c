"""Canary rollback time after the fault starts: the demo model served as stable v1 and canary v2 (20%
of a steady load of new end users, 4 clients in flight), the canary turned faulty mid-run by
tests/faulty.py (its decoder raises, or takes 0.25 s longer per forward), the server's default rollback
settings (min 20 canary samples, +5% error rate, p95 x1.5 + 50 ms). Measured: seconds from the first
faulty forward to the automatic rollback, the canary requests it took, and the client-visible damage
(failed requests; slow canary answers) over the same horizon against a peer run in the same process
with automatic rollback off.

    python -m bench.canary [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from litestar.testing import TestClient

from app.models.entry import ModelEntry
from app.models.families.coca import CoCaModel
from app.server import create_app
from app.settings import BUNDLED_MODEL, Settings
from bench.report import command_line, publish, table
from tests.faulty import Fault, faulty_demo
from tests.slow_server import image_url

WEIGHT = 0.2
CLIENTS = 4
SLOW_S = 0.25  # the slow canary's extra time per decoder forward (about +1 s a request)
BODY = {"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": image_url()}}, {"type": "text", "text": "what color is the object?"}]}]}


def run(models, fault: Fault, mode: str, auto: bool, warm_s: float, horizon_s: float, tag: str) -> dict:
    settings = Settings(router_enabled=False, audit_log="off", canary=(f"demo@v2={WEIGHT}",),
                        canary_auto_rollback=auto)
    seen: list[tuple[float, int, str, float]] = []  # (sent at, status, version, latency)
    stop = threading.Event()
    fault.set("")
    with TestClient(create_app(settings, models)) as client:
        def load(worker: int) -> None:
            i = 0
            while not stop.is_set():
                sent = time.time()
                r = client.post("/v1/chat/completions", json={**BODY, "user": f"{tag}-{worker}-{i}"})
                seen.append((sent, r.status_code, r.headers.get("x-mmserve-model-version", ""), time.time() - sent))
                i += 1

        threads = [threading.Thread(target=load, args=(w,)) for w in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(warm_s)
        fault.set(mode, SLOW_S)
        fault_set = time.time()
        time.sleep(horizon_s)
        stop.set()
        for t in threads:
            t.join(60)
        status = client.get("/v1/admin/models/demo/canary").json()
    fault.set("")
    start = fault.started or fault_set
    rollback = status["rollback"]
    after = [s for s in seen if s[0] >= fault_set]
    until = rollback["at"] if rollback else float("inf")
    return {"mode": mode, "auto_rollback": auto, "requests": len(seen),
            "req_s": round(len(seen) / (warm_s + horizon_s), 1),
            "rollback_s": round(rollback["at"] - start, 3) if rollback else None,
            "canary_requests_to_verdict": sum(1 for s in after if (s[2] == "v2" or s[1] >= 500) and s[0] < until),
            "failed": sum(1 for s in after if s[1] >= 500),
            "canary_answers_after_fault": sum(1 for s in after if s[2] == "v2" and s[1] == 200),
            "stable_p95_s": status["window"]["stable"]["p95_s"], "canary_p95_s": status["window"]["canary"]["p95_s"],
            "reason": (rollback or {}).get("reason", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run per case, a 10 s horizon (about 2 minutes)")
    args = parser.parse_args()
    repeats, warm_s, horizon_s = (1, 4.0, 10.0) if args.quick else (3, 5.0, 20.0)
    fault = Fault()
    models = [(ModelEntry("demo", BUNDLED_MODEL, version="v1"), CoCaModel.from_dir(BUNDLED_MODEL)),
              (ModelEntry("demo", BUNDLED_MODEL, version="v2"), faulty_demo(fault))]
    rows = []
    for mode in ("raise", "slow"):
        for r in range(repeats):
            for auto in (True, False):  # the peer, same process, same load: no automatic rollback
                rows.append(run(models, fault, mode, auto, warm_s, horizon_s, f"{mode}{r}{auto}"))
                print(rows[-1], flush=True)
    summary = {"quick": args.quick, "weight": WEIGHT, "clients": CLIENTS, "horizon_s": horizon_s}
    for mode, damage in (("raise", "failed"), ("slow", "canary_answers_after_fault")):
        auto = [x for x in rows if x["mode"] == mode and x["auto_rollback"]]
        peer = [x for x in rows if x["mode"] == mode and not x["auto_rollback"]]
        times = [x["rollback_s"] for x in auto if x["rollback_s"] is not None]
        summary[f"{mode}_rollback_s_median"] = round(statistics.median(times), 3) if times else None
        summary[f"{mode}_rolled_back"] = f"{len(times)}/{len(auto)}"
        summary[f"{mode}_{damage}_auto"] = sum(x[damage] for x in auto)
        summary[f"{mode}_{damage}_peer"] = sum(x[damage] for x in peer)
        summary[f"{mode}_damage_ratio_peer_over_auto"] = round(
            summary[f"{mode}_{damage}_peer"] / max(1, summary[f"{mode}_{damage}_auto"]), 2)
    columns = ["mode", "auto_rollback", "requests", "req_s", "rollback_s", "canary_requests_to_verdict", "failed",
               "canary_answers_after_fault"]
    sections = [(f"rollback after the fault starts (canary weight {WEIGHT}, {CLIENTS} clients, horizon "
                 f"{horizon_s:g} s after the fault; machine shared: absolutes noisy)", table(rows, columns))]
    publish("canary", command_line(), summary, sections, details={"runs": rows})


if __name__ == "__main__":
    main()
