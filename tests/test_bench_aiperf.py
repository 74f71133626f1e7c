"""bench/aiperf.py reads AIPerf's figures right: the parser on real exports saved from bench.serve runs
(transformers serve, 125M Mllama, concurrency 8; paths in them replaced by /REPO), checked against the
CSV AIPerf wrote in the same run, and the dataset the harness writes is what AIPerf's single_turn reads."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from pathlib import Path

from PIL import Image

from bench.aiperf import parse_export, write_dataset

DATA = Path(__file__).parent / "data" / "aiperf"


def csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row[0]: dict(zip(["avg", "min", "max", "sum", "p1", "p5", "p10", "p25", "p50", "p75", "p90", "p95",
                                  "p99", "std"], row[1:])) for row in csv.reader(f) if row}


def test_parser_reads_the_figures_aiperf_printed_in_its_csv():
    result = parse_export(DATA / "transformers_serve_c8.json", concurrency=8)
    table = csv_rows(DATA / "transformers_serve_c8.csv")

    def close(ours: float, metric: str, stat: str) -> bool:
        return math.isclose(ours, float(table[metric][stat]), rel_tol=0, abs_tol=0.006)  # the CSV rounds to 2 places

    assert (result.concurrency, result.requests, result.errors) == (8, 8, 0)
    assert close(result.output_tok_s, "Output Token Throughput (tokens/sec)", "avg")
    assert close(result.ttft_p50_ms, "Time to First Token (ms)", "p50")
    assert close(result.ttft_p95_ms, "Time to First Token (ms)", "p95")
    assert close(result.itl_p50_ms, "Inter Token Latency (ms)", "p50")
    assert close(result.latency_p50_ms, "Request Latency (ms)", "p50")
    assert close(result.latency_p95_ms, "Request Latency (ms)", "p95")
    assert close(result.output_tokens_mean, "Output Sequence Length (tokens)", "avg")
    assert close(result.duration_s, "Benchmark Duration (sec)", "avg")
    assert result.requests == int(float(table["Request Count"]["avg"]))
    # throughput is the output tokens over the run's duration
    assert math.isclose(result.output_tok_s * result.duration_s, result.output_tokens_mean * result.requests, rel_tol=1e-3)


def test_a_run_whose_requests_failed_counts_them(tmp_path):
    """AIPerf's export when requests fail: error_summary entries with a count, and no latency metrics."""
    export = json.loads((DATA / "transformers_serve_c8.json").read_text())
    failed = {k: v for k, v in export.items() if k not in ("request_latency", "time_to_first_token",
                                                           "inter_token_latency", "output_token_throughput",
                                                           "request_count")}
    failed["error_summary"] = [{"error_details": {"code": 422, "type": "Unprocessable Entity",
                                                  "message": "Unexpected fields in the request: {'ignore_eos'}"},
                                "count": 8}]
    (tmp_path / "failed.json").write_text(json.dumps(failed))
    result = parse_export(tmp_path / "failed.json", concurrency=8)
    assert (result.requests, result.errors) == (8, 8)
    assert math.isnan(result.ttft_p50_ms) and math.isnan(result.output_tok_s)
    assert result.error_kinds == ("Unexpected fields in the request: {'ignore_eos'}",)


def test_dataset_rows_carry_a_distinct_png_per_request(tmp_path):
    rows = [json.loads(line) for line in write_dataset(tmp_path / "d.jsonl", rows=3, size=56).read_text().splitlines()]
    assert len(rows) == 3 and all(set(r) == {"text", "image"} for r in rows)
    pictures = []
    for r in rows:
        head, payload = r["image"].split(",", 1)
        assert head == "data:image/png;base64"
        pictures.append(Image.open(io.BytesIO(base64.b64decode(payload))))
    assert all(p.size == (56, 56) for p in pictures)
    assert len({p.tobytes() for p in pictures}) == 3
