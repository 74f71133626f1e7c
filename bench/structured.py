"""Structured outputs: what a grammar costs and whether its answers hold, on the 125M random-weight
Llama-3.2-Vision served over HTTP (`python -m app.cli serve --model mllama=DIR`).

    python -m bench.structured [--quick]

1. N requests (64; --quick 32), 16 in flight, each asking for a JSON schema of nested objects, enums,
   arrays and numbers (response_format json_schema, temperature 1, a seed each): the share of answers
   that parse and validate (jsonschema, independent of the grammar library).
2. The same requests without a grammar, each forced to the same number of tokens as its constrained
   answer (max_tokens = that count, ignore_eos): tokens/s constrained / unconstrained, same run.
3. Grammar compile time (p50 of distinct schemas, cold) and the compile cache's hit rate over a stream
   of requests drawing from 8 schemas, on the same model's vocabulary (in process).
4. The demo model (in process): a guided choice over its answer words, answers in the choice, tokens/s
   against the same questions unconstrained.

The machine is shared with other work: the ratios are measured in the same run, the absolutes are noisy.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import jsonschema

from bench.report import command_line, publish, table
from bench.serve import checkpoint, mmserve_launch
from bench.server_process import free_port, serving

SCHEMA = {
    "type": "object",
    "properties": {
        "merchant": {"type": "string", "maxLength": 16},
        "category": {"enum": ["food", "travel", "office", "other"]},
        "total": {"type": "number", "minimum": 0, "maximum": 10000, "multipleOf": 0.01},
        "items": {"type": "array", "maxItems": 4, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 12},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                           "price": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01}},
            "required": ["name", "qty"]}},
        "payment": {"type": "object", "properties": {
            "method": {"enum": ["cash", "card", "phone"]},
            "last4": {"type": "string", "pattern": "^[0-9]{4}$"}}, "required": ["method"]},
    },
    "required": ["merchant", "category", "total", "items", "payment"],
}
QUESTIONS = ["Read this receipt.", "Extract the fields of the receipt as JSON.", "What did I buy, and for how much?",
             "Give me the receipt's merchant, items and total."]
MAX_TOKENS = 256
IN_FLIGHT = 16


def chat(base: str, model: str, i: int, **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "temperature": 1.0, "seed": i, **extra}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def run(base: str, model: str, n: int, per_request) -> tuple[list[dict], float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        answers = list(pool.map(lambda i: chat(base, model, i, **per_request(i)), range(n)))
    return answers, time.perf_counter() - start


def exact(text: str):
    """JSON with its numbers as Decimals: jsonschema's multipleOf on binary floats rejects 0.07 (0.07 / 0.01
    is 7.000000000000001), so both the answer and the schema are read exactly."""
    return json.loads(text, parse_float=Decimal)


def valid(answer: dict) -> bool:
    choice = answer["choices"][0]
    try:
        jsonschema.validate(exact(choice["message"]["content"]), exact(json.dumps(SCHEMA)))
    except (ValueError, jsonschema.ValidationError):
        return False
    return choice["finish_reason"] == "stop"


def http_section(n: int) -> dict:
    ckpt = checkpoint("125m")
    launch = mmserve_launch(free_port(), {"mllama": ckpt})
    fmt = {"type": "json_schema", "json_schema": {"name": "receipt", "schema": SCHEMA, "strict": True}}
    with serving(launch, Path("bench/out/structured/server.log")) as server:
        chat(server.base_url, "mllama", 0, max_tokens=4)  # warm up
        constrained, t_con = run(server.base_url, "mllama", n, lambda i: {"response_format": fmt,
                                                                          "max_tokens": MAX_TOKENS})
        counts = [a["usage"]["completion_tokens"] for a in constrained]
        free, t_free = run(server.base_url, "mllama", n, lambda i: {"max_tokens": counts[i], "ignore_eos": True})
    tokens = sum(counts)
    assert sum(a["usage"]["completion_tokens"] for a in free) == tokens, "the free run must match the token counts"
    return {"requests": n, "valid_share": sum(map(valid, constrained)) / n,
            "finish_length": sum(a["choices"][0]["finish_reason"] == "length" for a in constrained),
            "tokens": tokens, "mean_tokens": tokens / n,
            "constrained_tok_s": tokens / t_con, "free_tok_s": tokens / t_free,
            "ratio": (tokens / t_con) / (tokens / t_free)}


def compile_section() -> dict:
    from llm.grammar.compiler import GrammarCompiler
    from llm.grammar.llguidance_backend import LLGuidanceBackend
    from llm.grammar.spec import GrammarSpec, closed_schema
    from llm.loading.chat_template import HFChatTokenizer

    vocabulary = HFChatTokenizer(checkpoint("125m")).vocabulary()
    variants = []
    for k in range(8):  # 8 distinct schemas: the receipt with another enum each
        schema = copy.deepcopy(SCHEMA)
        schema["properties"]["category"]["enum"] = [f"kind{k}-{j}" for j in range(4)]
        variants.append(GrammarSpec.json_schema(closed_schema(schema)))
    compiler = GrammarCompiler(LLGuidanceBackend(vocabulary))
    for i in range(64):
        compiler.get(variants[(i * 5) % 8] if i >= 8 else variants[i])
    cold = [s * 1e3 for s in compiler.compile_seconds]
    compiler.close()
    return {"vocabulary": len(vocabulary.surfaces), "distinct_schemas": len(cold),
            "compile_ms_p50": statistics.median(cold), "compile_ms_max": max(cold),
            "cache_hit_rate": compiler.hits / (compiler.hits + compiler.misses)}


def demo_section(n: int) -> dict:
    import random

    from app.models.families.coca import CoCaModel
    from app.settings import BUNDLED_MODEL
    from demo import world
    from llm.engine import Engine, EngineConfig, ImageInput, tensor_digest
    from llm.grammar.spec import GrammarSpec
    from llm.loading.chat_format import Turn
    from llm.params import SamplingParams

    model = CoCaModel.from_dir(BUNDLED_MODEL)
    rng = random.Random(1)
    scenes = [world.sample_scene(rng) for _ in range(n)]
    images = [ImageInput(tensor_digest(f.tokens), f.tokens) for f in model.encode_images([world.render(s) for s in scenes])]
    words = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "yes", "no", "one", "two"]
    prompt = model.prompt_ids([Turn("what color is the object ?")])
    engine = Engine(model.decoder, model.tokenizer, model.stop_ids, EngineConfig(max_num_seqs=IN_FLIGHT),
                    model.vocabulary)
    spec = GrammarSpec.choice(words)
    start = time.perf_counter()
    con = engine.generate([(prompt, img, SamplingParams(max_tokens=4, temperature=1.0, seed=i, grammar=spec))
                           for i, img in enumerate(images)])
    t_con = time.perf_counter() - start
    counts = [o.completion_tokens for o in con]
    start = time.perf_counter()
    engine.generate([(prompt, img, SamplingParams(max_tokens=c, temperature=1.0, seed=i, ignore_eos=True))
                     for i, (img, c) in enumerate(zip(images, counts))])
    t_free = time.perf_counter() - start
    return {"requests": n, "in_choice_share": sum(o.text in words for o in con) / n,
            "constrained_tok_s": sum(counts) / t_con, "free_tok_s": sum(counts) / t_free,
            "ratio": t_free / t_con, "answers": sorted({o.text for o in con})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 HTTP requests instead of 64 (under 5 minutes)")
    args = parser.parse_args()
    n = 32 if args.quick else 64
    http = http_section(n)
    compiled = compile_section()
    demo = demo_section(64)
    summary = {"valid_share": http["valid_share"], "tok_s_ratio": round(http["ratio"], 3),
               "compile_ms_p50": round(compiled["compile_ms_p50"], 2), "cache_hit_rate": compiled["cache_hit_rate"],
               "demo_in_choice_share": demo["in_choice_share"], "demo_tok_s_ratio": round(demo["ratio"], 3),
               "requests": n, "quick": args.quick}
    sections = [
        ("125M Llama-3.2-Vision over HTTP, JSON schema, 16 in flight (machine shared: absolutes noisy)",
         table([{k: v for k, v in http.items()}])),
        ("grammar compile (in process, the 125M model's vocabulary)", table([compiled])),
        ("demo model: a choice over its answer words (in process)",
         table([{k: v for k, v in demo.items() if k != "answers"}])),
    ]
    publish("structured", command_line(), summary, sections, details={"http": http, "compile": compiled, "demo": demo})


if __name__ == "__main__":
    main()
