"""bench/vision.py's pieces at tiny sizes (a 1-layer ViT, a few demo images): the figures it reports are
well-formed and the counts are right. Speed targets belong to the benchmark run, never to unit tests."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from bench import report
from bench import vision as bench
from vision.stage import VisionStage, VisionStageConfig


@pytest.fixture(scope="module")
def tiny_encoder():
    return bench.build_encoder("tiny-vit")


@pytest.fixture(scope="module")
def rows(demo_runtime):
    return bench.reduction_accuracy(demo_runtime, n_images=3, max_new_tokens=12, prefill_batch=2)


def test_stage_pieces_latency_single_flight_and_disk_hits_in_a_new_process(tiny_encoder, tmp_path):
    images = bench.scene_pngs(4, seed=1)
    with VisionStage(tiny_encoder, VisionStageConfig(disk_dir=str(tmp_path))) as stage:
        lat = bench.latency(stage, images[:2], hot_repeats=3)
        runs = bench.encoder_runs_for_concurrent(stage, images[2])
    assert lat["cold_ms"] > 0 and lat["hot_ms"] > 0 and len(lat["cold_samples"]) == 2
    assert runs == 1
    disk = bench.disk_hits_in_new_process("tiny-vit", str(tmp_path), images[:2])
    assert disk["sources"] == ["disk", "disk"] and disk["encoder_images"] == 0 and disk["disk_ms"] > 0


def test_batching_counts_forwards_and_reports_throughputs(tiny_encoder):
    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in bench.scene_pngs(4, seed=2)]
    out = bench.batching(tiny_encoder, pictures, repeats=1, max_wait_ms=200)
    assert out["images"] == 4 and 1 <= out["batched_forwards"] < 4
    for name in ("sequential_per_s", "batched_per_s", "bare_sequential_per_s", "bare_batched_per_s",
                 "batched_over_sequential_throughput", "bare_batched_over_sequential"):
        assert out[name] > 0, name


def test_reduction_rows_cover_every_method_and_share(rows):
    assert [(r["method"], r["share"]) for r in rows] == [(m, s) for m in bench.METHODS for s in bench.SHARES]
    tokens = {m: [r["tokens"] for r in rows if r["method"] == m] for m in bench.METHODS}
    assert tokens == {"pool": [64, 16, 16, 9], "tome": [64, 32, 16, 8], "keep": [64, 32, 16, 8]}
    full = rows[0]
    for r in rows:
        assert 0 <= r["caption_exact_match"] <= 1 and 0 <= r["answer_accuracy"] <= 1 and r["prefill_ms"] > 0
        assert r["accuracy"] == pytest.approx((r["caption_exact_match"] + r["answer_accuracy"]) / 2)
        assert r["retained"] == pytest.approx(r["accuracy"] / full["accuracy"])
        if r["share"] == 1.0:
            assert r["retained"] == 1.0


def test_summary_is_one_json_line_printed_last(rows, tmp_path, monkeypatch, capsys):
    lat = {"cold_ms": 50.0, "hot_ms": 0.2, "cold_samples": [50.0]}
    disk = {"disk_ms": 2.0, "sources": ["disk"], "encoder_images": 0}
    batch = {"batched_over_sequential_throughput": 1.5}
    summary = bench.summarize(lat, disk, 1, batch, rows)
    assert summary["hot_hit_over_cold"] == pytest.approx(0.004) and summary["encoder_runs_for_16_concurrent"] == 1
    at_25 = {r["method"]: r["retained"] for r in rows if r["share"] == 0.25}
    assert summary["best_method_at_25pct"] in at_25
    assert summary["best_accuracy_retained_at_25pct"] == pytest.approx(max(at_25.values()), abs=1e-4)
    assert summary["targets_met"]["hot_hit_over_cold"] is True and summary["targets_met"]["encoder_runs_for_16_concurrent"]
    assert summary["targets_met"]["best_accuracy_retained_at_25pct"] == (summary["best_accuracy_retained_at_25pct"] >= 0.97)

    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(report, "RESULTS_MD", tmp_path / "RESULTS.md")
    for _ in range(2):  # a second run replaces the section rather than adding one
        report.publish("vision", "python -m bench.vision --quick", summary, [("t", "| a |")], details={"rows": rows})
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("hot_hit_over_cold", "encoder_runs_for_16_concurrent", "batched_over_sequential_throughput",
                "best_accuracy_retained_at_25pct"):
        assert key in last
    assert json.loads((tmp_path / "results" / "vision.json").read_text())["details"]["rows"] == rows
    assert (tmp_path / "RESULTS.md").read_text().count("<!-- bench:vision -->") == 1
