"""AIPerf (NVIDIA's load generator for OpenAI-compatible servers) as the benchmarks drive it: a dataset
of image + question chat requests, one `aiperf profile` run, and the figures read back from its export.

AIPerf lives in its own virtual environment: its pins (pillow 12, rich 14, prometheus-client 0.23 ...)
clash with mmserve's, so it is a separate program here, found as $MMSERVE_AIPERF, .venv-aiperf/bin/aiperf
or `aiperf` on PATH. Install: `python -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf==0.13.0`.

Facts measured here (aiperf 0.13.0): the `single_turn` JSONL dataset carries `data:` image URLs; plain
concurrency mode busy-polls a whole core, so every run adds `--request-rate 500 --arrival-pattern
constant` (still capped by --concurrency); HF_HUB_OFFLINE must be unset for it (it routes even a local
tokenizer path through the hub cache code); it needs a tokenizer to count tokens (a checkpoint dir does).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.models import random_pictures

REPO = Path(__file__).resolve().parent.parent
EXPORT = "profile_export_aiperf.json"  # the summary
RECORDS = "profile_export.jsonl"  # one record per request
QUESTIONS = ("What is in this picture?", "Describe the image in one sentence.", "What colours do you see?",
             "Is there a person in this image?", "What is the main object here?")


def aiperf_binary() -> Path:
    for candidate in (os.environ.get("MMSERVE_AIPERF"), REPO / ".venv-aiperf" / "bin" / "aiperf", shutil.which("aiperf")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("aiperf not found: set MMSERVE_AIPERF, or `python -m venv .venv-aiperf && "
                            ".venv-aiperf/bin/pip install aiperf==0.13.0` in the repository root")


def write_dataset(path: Path, rows: int, seed: int = 0, size: int = 112) -> Path:
    """`rows` requests, each a different random picture (so no server reuses an image's features) as a
    PNG data: URL and a short question; AIPerf's single_turn JSONL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, picture in enumerate(random_pictures(rows, seed, size=(size, size))):
            png = io.BytesIO()
            picture.save(png, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
            f.write(json.dumps({"text": QUESTIONS[i % len(QUESTIONS)], "image": url}) + "\n")
    return path


@dataclass(frozen=True)
class LoadResult:
    """One AIPerf run's figures (times in ms). `errors` counts failed requests; `output_tokens_mean` is
    AIPerf's client-side count (the output text re-tokenized with the given tokenizer)."""
    concurrency: int
    requests: int
    errors: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    output_tokens_mean: float
    duration_s: float
    error_kinds: tuple[str, ...] = ()

    def row(self) -> dict:
        return asdict(self)


def parse_run(out_dir: Path, concurrency: int) -> LoadResult:
    """Figures from one run's artifacts: the summary (profile_export_aiperf.json) and the per-request
    records (profile_export.jsonl), which also carry each failed request's error. When every request
    failed AIPerf writes no summary: the figures then read as NaN and `errors` says why."""
    out_dir = Path(out_dir)
    records = [json.loads(line) for line in (out_dir / RECORDS).read_text().splitlines() if line.strip()]
    failed = [r["error"] for r in records if r.get("error")]
    summary = json.loads((out_dir / EXPORT).read_text()) if (out_dir / EXPORT).is_file() else {}

    def stat(name: str, key: str) -> float:
        return float(summary.get(name, {}).get(key, float("nan")))

    kinds = tuple(sorted({(f"{e['code']} " if e.get("code") else "") + str(e.get("message"))[:200] for e in failed}))
    return LoadResult(concurrency=concurrency, requests=len(records), errors=len(failed),
                      output_tok_s=stat("output_token_throughput", "avg"), ttft_p50_ms=stat("time_to_first_token", "p50"),
                      ttft_p95_ms=stat("time_to_first_token", "p95"), itl_p50_ms=stat("inter_token_latency", "p50"),
                      latency_p50_ms=stat("request_latency", "p50"), latency_p95_ms=stat("request_latency", "p95"),
                      output_tokens_mean=stat("output_sequence_length", "avg"),
                      duration_s=stat("benchmark_duration", "avg"), error_kinds=kinds)


def profile(base_url: str, model: str, dataset: Path, concurrency: int, requests: int, tokenizer: Path,
            new_tokens: int, extra_body: dict, out_dir: Path, timeout_s: float = 1800) -> LoadResult:
    """One streaming chat run: `requests` requests from `dataset`, `concurrency` in flight, each asking for
    `new_tokens` (max_completion_tokens) with `extra_body` merged into every request body."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(aiperf_binary()), "profile", "--model", model, "--url", base_url, "--endpoint-type", "chat",
            "--streaming", "--input-file", str(dataset), "--custom-dataset-type", "single_turn",
            "--dataset-sampling-strategy", "sequential", "--concurrency", str(concurrency),
            "--request-count", str(requests), "--request-rate", "500", "--arrival-pattern", "constant",
            "--tokenizer", str(tokenizer), "--osl", str(new_tokens), "--extra-inputs", json.dumps(extra_body),
            "--output-artifact-dir", str(out_dir), "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry"]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = ""  # AIPerf is its own program: none of this repository's modules
    with (out_dir / "aiperf_stdout.txt").open("w") as log:
        done = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if not (out_dir / RECORDS).is_file():  # it exits 1 when every request failed, records written all the same
        tail = (out_dir / "aiperf_stdout.txt").read_text()[-2000:]
        raise RuntimeError(f"aiperf exited {done.returncode} (log {out_dir / 'aiperf_stdout.txt'}):\n{tail}")
    return parse_run(out_dir, concurrency)
