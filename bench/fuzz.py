"""`python -m bench.fuzz [--quick]`: schemathesis against mmserve's own OpenAPI schema, at volume.

The same checks as tests/test_schemathesis.py (no 5xx; every answer has a documented status, content type
and body), driven by schemathesis' own runner (`st run`: examples, coverage, fuzzing and stateful phases)
against the bundled demo model served by a real process on loopback. The full run generates well over
1000 requests; --quick fewer. The figures: requests generated, failures by check, the server's own count of
5xx answers read back from /metrics (an independent witness of the "no 5xx" claim).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.report import command_line, publish, table
from bench.server_process import serving
from tests.test_schemathesis import fuzz_launch

ST = str(Path(sys.executable).parent / "st")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
GENERATED = re.compile(r"(\d+) generated(?:, (\d+) found (\d+) unique failures)?")
FAILURE = re.compile(r"❌ (ST\d+ [^:]+): (\d+)")
STATUS_5XX = re.compile(r'^mmserve_requests_total\{[^}]*status="5\d\d"[^}]*\} (\S+)', re.M)


def server_5xx(base: str) -> float:
    return sum(float(v) for v in STATUS_5XX.findall(httpx.get(base + "/metrics", timeout=30).text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples per operation (~2 minutes)")
    parser.add_argument("--max-examples", type=int, default=0, help="per operation and phase (default 60, quick 10)")
    args = parser.parse_args()
    examples = args.max_examples or (10 if args.quick else 60)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        with serving(fuzz_launch(data), data / "server.log", start_timeout_s=300) as served:
            start = time.monotonic()
            run = subprocess.run([ST, "run", served.base_url + "/schema/openapi.json", "--checks", CHECKS,
                                  "--max-examples", str(examples), "--request-timeout", "120", "--seed", "1",
                                  "--no-color"], capture_output=True, text=True)
            seconds = time.monotonic() - start
            fives = server_5xx(served.base_url)
    out = run.stdout + run.stderr
    counts = GENERATED.findall(out)
    if not counts:
        sys.exit(f"schemathesis printed no summary (exit {run.returncode}):\n{out[-3000:]}")
    generated, _, failures = counts[-1]
    by_check = {name: int(n) for name, n in FAILURE.findall(out)}
    summary = {"requests_generated": int(generated), "failures": int(failures or 0), "server_5xx": int(fives),
               "seconds": round(seconds, 1), "max_examples": examples}
    rows = [{"figure": k, "value": v} for k, v in summary.items()]
    rows += [{"figure": f"failures: {name}", "value": n} for name, n in by_check.items()]
    publish("fuzz", command_line(), summary, [("schemathesis against the app's own OpenAPI schema", table(rows))],
            details={"schemathesis_tail": out[-4000:]})


if __name__ == "__main__":
    main()
