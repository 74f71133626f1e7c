"""bench/aiperf.py reads AIPerf's figures right, on real artifacts saved from runs of this harness (aiperf
0.13.0; paths in them replaced by /REPO): transformers serve on the 125M Mllama at concurrency 8 (the parser
checked against the CSV AIPerf wrote in the same run), a run where two of four requests failed (a broken
image: a 500, and a reset connection), and one where every request was refused (422, no summary written).
And the dataset the harness writes is what AIPerf's single_turn reads."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from pathlib import Path

from PIL import Image

from bench.aiperf import parse_run, write_dataset

DATA = Path(__file__).parent / "data" / "aiperf"
STATS = ["avg", "min", "max", "sum", "p1", "p5", "p10", "p25", "p50", "p75", "p90", "p95", "p99", "std"]


def csv_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row[0]: dict(zip(STATS, row[1:])) for row in csv.reader(f) if row}


def check_against_csv(run: Path, concurrency: int):
    result = parse_run(run, concurrency)
    table = csv_rows(run / "profile_export_aiperf.csv")

    def close(ours: float, metric: str, stat: str) -> bool:
        return math.isclose(ours, float(table[metric][stat]), rel_tol=0, abs_tol=0.006)  # the CSV rounds to 2 places

    assert close(result.output_tok_s, "Output Token Throughput (tokens/sec)", "avg")
    assert close(result.ttft_p50_ms, "Time to First Token (ms)", "p50")
    assert close(result.ttft_p95_ms, "Time to First Token (ms)", "p95")
    assert close(result.itl_p50_ms, "Inter Token Latency (ms)", "p50")
    assert close(result.latency_p50_ms, "Request Latency (ms)", "p50")
    assert close(result.latency_p95_ms, "Request Latency (ms)", "p95")
    assert close(result.output_tokens_mean, "Output Sequence Length (tokens)", "avg")
    assert close(result.duration_s, "Benchmark Duration (sec)", "avg")
    assert result.requests - result.errors == int(float(table["Request Count"]["avg"]))  # successes only
    return result


def test_parser_reads_the_figures_aiperf_printed_in_its_csv():
    result = check_against_csv(DATA / "transformers_serve_c8", concurrency=8)
    assert (result.concurrency, result.requests, result.errors, result.error_kinds) == (8, 24, 0, ())
    # throughput is the output tokens over the run's duration
    assert math.isclose(result.output_tok_s * result.duration_s, result.output_tokens_mean * result.requests,
                        rel_tol=1e-3)


def test_failed_requests_are_counted_with_their_errors():
    result = check_against_csv(DATA / "mixed_failures", concurrency=2)
    assert (result.requests, result.errors) == (4, 2)
    assert result.error_kinds == ("500 Internal Server Error", "ClientOSError(104, 'Connection reset by peer')")


def test_a_run_where_every_request_failed_has_errors_and_no_figures():
    result = parse_run(DATA / "all_refused_422", concurrency=2)
    assert (result.requests, result.errors) == (4, 4)
    assert result.error_kinds == ("""422 {"detail":"Unexpected fields in the request: {'ignore_eos'}"}""",)
    assert math.isnan(result.output_tok_s) and math.isnan(result.ttft_p50_ms)


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
