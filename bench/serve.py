"""`python -m bench.serve [--quick]`: mmserve vs `transformers serve`, over HTTP, under AIPerf.

Both servers serve the same random-weight 125M Llama-3.2-Vision checkpoint (bench/hf_checkpoints.py,
laid out as the hub lays it out) as subprocesses on loopback; AIPerf (bench/aiperf.py) sends the same
streaming chat requests to each: a different random 112x112 picture per request as a data: URL and a
short question, 32 output tokens each, lengths forced (random weights may emit an end token anywhere),
greedy (temperature 0), at concurrency 1, 8 and 16. Per server and concurrency: output tokens/s, time to
first token p50/p95, inter-token latency p50, request latency p50/p95, errors.

Targets, as ratios measured in the same run: output tokens/s at concurrency 16 >= 5x transformers
serve's, and TTFT p50 at concurrency 8 <= 1/10 of transformers serve's. transformers serve is taken at its fastest here: the full run measures --dtype float32 and
bfloat16 and each ratio takes transformers' best figure of the two (and records what
--continuous-batching does with Mllama: it falls back to one request at a time); --quick runs the dtype
named by --hf-dtype (bfloat16, the faster at concurrency 16 here).

How each server is told to emit exactly 32 tokens: transformers serve refuses unknown fields (422) but
takes a `generation_config` JSON string, so {"min_new_tokens": 32}; mmserve: vLLM's `ignore_eos`.

Until `mmserve serve --model NAME=DIR` lands, the mmserve rows are "not available" and `--demo`
checks the harness on the bundled demo model (its own model, so no ratio). `--two-models` measures
serving two checkpoints at once (RSS of one vs two, and a routed alias's latency vs naming the model).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from bench import aiperf
from bench.hf_checkpoints import PRESETS, write_mllama_checkpoint
from bench.report import command_line, publish, table
from bench.server_process import Launch, free_port, serving, warm_up

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out" / "serve"
NEW_TOKENS = 32
MLLAMA_NAME = "mllama"  # the name mmserve serves the checkpoint under
ROUTED_ALIAS = "auto"  # the registry's routed model name (--two-models): the router picks the model


def mmserve_launch(port: int, models: dict[str, Path] | None = None, dtype: str = "float32",
                   router: bool = False) -> Launch:
    """The one place the mmserve command is spelled. models: name -> checkpoint dir (`--model NAME=DIR`,
    repeatable, the registry's CLI); None = the bundled demo model ("mmserve-demo", an image per request).
    The rate limit is off, and the staged router unless `router`: transformers serve has neither."""
    argv = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    for name, directory in (models or {}).items():
        argv += ["--model", f"{name}={directory}"]
    env = {"MMSERVE_ROUTER_ENABLED": str(router).lower(), "MMSERVE_RATE_LIMIT_RPM": "0", "MMSERVE_DTYPE": dtype,
           "MMSERVE_REQUEST_TIMEOUT_S": "600", "PYTHONPATH": str(REPO)}
    name = next(iter(models)) if models else "mmserve-demo"
    return Launch("mmserve" if models else "mmserve (demo model)", argv, env, name, "/ready",
                  {"ignore_eos": True})


def transformers_launch(port: int, checkpoint: Path, dtype: str, continuous_batching: bool = False) -> Launch:
    """`transformers serve DIR`: it serves the directory under its path as the model name."""
    argv = [str(Path(sys.executable).with_name("transformers")), "serve", str(checkpoint), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", dtype, "--log-level", "info"]
    if continuous_batching:
        argv.append("--continuous-batching")
    label = f"transformers serve --dtype {dtype}" + (" --continuous-batching" if continuous_batching else "")
    return Launch(label, argv, {"HF_HUB_OFFLINE": "1"}, str(checkpoint), "/health",
                  {"generation_config": json.dumps({"min_new_tokens": NEW_TOKENS})})


def checkpoint(preset: str = "125m", seed: int = 0) -> Path:
    """The benchmark's checkpoint, built once (bench/out is not committed)."""
    path = REPO / "bench" / "out" / (f"mllama-{preset}" + ("" if seed == 0 else f"-seed{seed}"))
    if not (path / "config.json").is_file():
        write_mllama_checkpoint(path, **PRESETS[preset], seed=seed)
    return path


def measure(launch: Launch, concurrencies: dict[int, int], dataset: Path, tokenizer: Path, tag: str) -> list[dict]:
    """Start the server, warm it with one request, one AIPerf run per concurrency (c -> requests), stop it.
    A server that does not come up gives one row saying why."""
    log = OUT / f"{tag}.log"
    try:
        with serving(launch, log) as server:
            warm_up(server, dataset, NEW_TOKENS)
            rows = []
            for c, n in concurrencies.items():
                result = aiperf.profile(server.base_url, launch.model, dataset, c, n, tokenizer, NEW_TOKENS,
                                        {"temperature": 0, **launch.force_length}, OUT / f"{tag}-c{c}")
                rows.append({"server": launch.label, **result.row(), "rss_mib": server.rss_mib()})
                print(f"{launch.label} c={c}: {result.output_tok_s:.1f} tok/s, TTFT p50 {result.ttft_p50_ms:.0f} ms, "
                      f"errors {result.errors}", flush=True)
            return rows
    except RuntimeError as e:
        print(f"{launch.label}: {e}", flush=True)
        return [{"server": launch.label, "unavailable": str(e).splitlines()[0][:300]}]


def _at(rows: list[dict], c: int, key: str) -> float:
    """A figure of the run at concurrency c; NaN when there is none or any of its requests failed."""
    return next((r[key] for r in rows if r.get("concurrency") == c and r.get("errors") == 0), math.nan)


def transformers_best(configs: list[list[dict]]) -> dict:
    """transformers serve at its fastest here, per target metric, over the configurations measured alike:
    the most output tokens/s at concurrency 16, the least TTFT p50 at concurrency 8."""
    tok = [(_at(rows, 16, "output_tok_s"), rows[0]["server"]) for rows in configs]
    ttft = [(_at(rows, 8, "ttft_p50_ms"), rows[0]["server"]) for rows in configs]
    tok = max((t for t in tok if not math.isnan(t[0])), default=(math.nan, None))
    ttft = min((t for t in ttft if not math.isnan(t[0])), default=(math.nan, None))
    return {"hf_tok_s_c16": tok[0], "hf_tok_s_c16_config": tok[1], "hf_ttft_p50_ms_c8": ttft[0],
            "hf_ttft_p50_ms_c8_config": ttft[1]}


def ratios(ours: list[dict], best: dict) -> dict:
    tok = _at(ours, 16, "output_tok_s") / best["hf_tok_s_c16"]
    ttft = _at(ours, 8, "ttft_p50_ms") / best["hf_ttft_p50_ms_c8"]
    clean = lambda x: None if math.isnan(x) else round(x, 3)  # noqa: E731
    return {"tok_s_ratio_c16": clean(tok), "ttft_p50_ratio_c8": clean(ttft),
            "tok_s_target_met": None if math.isnan(tok) else tok >= 5,
            "ttft_target_met": None if math.isnan(ttft) else ttft <= 0.1}


def two_models(ckpt: Path, dataset: Path, requests: int, dtype: str) -> list[dict]:
    """mmserve with one checkpoint, then with two (a second seed: no weights shared): resident memory after a
    warm-up each; and with two, the same requests at concurrency 1 naming the model vs through the routed
    alias ROUTED_ALIAS (the staged router on, as a server runs by default, resolves it to one of the two):
    the latency difference is what routing costs a request."""
    second = checkpoint(seed=1)
    rows = []
    for models in ({MLLAMA_NAME: ckpt}, {MLLAMA_NAME: ckpt, f"{MLLAMA_NAME}-b": second}):
        launch = mmserve_launch(free_port(), models, dtype, router=True)
        try:
            with serving(launch, OUT / f"two-models-{len(models)}.log") as server:
                warm_up(server, dataset, NEW_TOKENS)
                row = {"models served": len(models), "rss_mib": server.rss_mib()}
                if len(models) == 2:
                    for name in (MLLAMA_NAME, ROUTED_ALIAS):
                        r = aiperf.profile(server.base_url, name, dataset, 1, requests, ckpt, NEW_TOKENS,
                                           {"temperature": 0, **launch.force_length}, OUT / f"two-models-{name}")
                        row[f"latency p50 ms ({name})"] = r.latency_p50_ms
                        row[f"errors ({name})"] = r.errors
                rows.append(row)
        except RuntimeError as e:
            rows.append({"models served": len(models), "unavailable": str(e).splitlines()[0][:300]})
    return rows


COLUMNS = ["server", "concurrency", "requests", "errors", "output_tok_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms",
           "latency_p50_ms", "latency_p95_ms", "output_tokens_mean", "rss_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 8 and 16, fewer requests (< 6 minutes)")
    parser.add_argument("--hf-dtype", default="bfloat16",
                        help="transformers serve's --dtype in --quick (the fastest at concurrency 16 in the full run)")
    parser.add_argument("--mmserve-dtype", default="float32", help="MMSERVE_DTYPE for the mmserve runs")
    parser.add_argument("--demo", action="store_true", help="also check the harness on mmserve's bundled demo model")
    parser.add_argument("--two-models", action="store_true", help="also the two-models section (needs the registry)")
    parser.add_argument("--skip-mmserve", action="store_true", help="transformers serve only")
    args = parser.parse_args()
    t0 = time.perf_counter()
    ckpt = checkpoint()
    # requests per concurrency, the same for both servers (how many queue behind the first burst moves TTFT);
    # transformers serve decodes one request at a time here, ~1-3 s each, which bounds them
    plan = {8: 16, 16: 16} if args.quick else {1: 8, 8: 32, 16: 48}
    dataset = aiperf.write_dataset(OUT / "requests.jsonl", max(plan.values()))
    sections, details = [], {}

    configs = [measure(transformers_launch(free_port(), ckpt, d), plan, dataset, ckpt, f"hf-{d}")
               for d in ((args.hf_dtype,) if args.quick else ("float32", "bfloat16"))]
    best = transformers_best(configs)
    hf_rows = [r for rows in configs for r in rows]
    if not args.quick:  # Mllama has no continuous batching in transformers: record what the flag does
        cb = transformers_launch(free_port(), ckpt, "float32", continuous_batching=True)
        hf_rows += measure(cb, {8: 8}, dataset, ckpt, "hf-cb")
        said = [line.strip() for line in (OUT / "hf-cb.log").read_text().splitlines() if "continuous batching" in line]
        details["continuous_batching_log"] = said[:3]

    ours = [] if args.skip_mmserve else measure(mmserve_launch(free_port(), {MLLAMA_NAME: ckpt}, args.mmserve_dtype), plan, dataset,
                                                ckpt, "mmserve")
    sections.append((f"Streaming chat, 125M Mllama, {NEW_TOKENS} output tokens, one image per request (AIPerf)",
                     table(hf_rows + ours, COLUMNS + ["unavailable"])
                     + "\n\noutput_tokens_mean is AIPerf's count of the streamed text re-tokenized (each server "
                       f"generated {NEW_TOKENS}); output_tok_s is that count over the run's duration. "
                     + (f"transformers serve with --continuous-batching: {details['continuous_batching_log']}"
                        if details.get("continuous_batching_log") else "")))
    summary = {**ratios(ours, best), **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in best.items()},
               "mmserve": "measured" if any("concurrency" in r for r in ours) else
               (ours[0]["unavailable"] if ours else "skipped")}
    if args.demo:
        demo = measure(mmserve_launch(free_port()), {1: 4, 8: 16}, dataset, ckpt, "mmserve-demo")
        sections.append(("Harness check: mmserve's bundled demo model (its own model: no ratio)", table(demo, COLUMNS)))
        summary["demo_harness_ok"] = all(r.get("errors") == 0 for r in demo) and bool(demo)
        details["demo"] = demo
    if args.two_models:
        both = two_models(ckpt, dataset, requests=8, dtype=args.mmserve_dtype)
        sections.append(("Two models served at once (mmserve)", table(both, list(dict.fromkeys(k for r in both for k in r)))))
        details["two_models"] = both
    details.update(transformers=hf_rows, mmserve=ours)
    summary.update(quick=args.quick, seconds=round(time.perf_counter() - t0, 1))
    publish("serve", command_line(), summary, sections, details=details)


if __name__ == "__main__":
    main()
