"""`python -m bench.router [--quick]`: the staged router against sending every request to the decoder.

A mixed workload on the demo world, on images of the independent renderer (tests/independent_world.py,
which the demo model never saw): per image a few identification questions phrased in varied natural
ways ("what shape is the red object?", "what is the blue thing?", "can you tell me what this is?"),
and questions of the spec's other families (counting, colour, size, yes/no, captions). Every answer
is judged by exact match against the renderer's ground truth.

Each request runs both ways, in alternating order so that a busy machine slows both alike:
- heavy-only: `runtime.answer(image, turns)`: encode the image, decode the answer;
- routed: encode the image, `StagedRouter.decide`, then the stage-1 reply or the decoder on the
  same features (as the chat path does).
Both include the image encode; the routed time includes the router's own cost on every request.

The router runs twice: with the server's settings (the intent of a prompt seen before comes from an
LRU) and "cold", embedding every prompt with MiniLM, which is what a stream of new prompts costs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

import torch

from app.routing.intent import IntentClassifier
from app.routing.staged import StagedRouter
from app.models.families.coca import CoCaModel
from app.settings import Settings
from bench.report import command_line, publish, table
from llm.loading.chat_format import Turn
from tests import independent_world as iw

# Identification phrasings; {c} is a colour that exactly one object has ("what shape is the {colour}
# object?" in the spec). The answer is that object's shape.
ABOUT_A_COLOUR = ["what shape is the {c} object?", "which shape is the {c} one?", "what is the {c} thing?",
                  "what kind of shape is the {c} object?", "tell me the shape of the {c} object",
                  "identify the {c} object for me", "what's the {c} one?", "can you name the {c} shape?"]
# Asked of one-object images only, where "it" is unambiguous.
ABOUT_THE_OBJECT = ["what is this?", "what shape is this?", "can you tell me what this is?",
                    "what object is in the picture?", "name this shape.", "which shape is shown?",
                    "what am i looking at?", "identify the object."]


@dataclass(frozen=True)
class Request:
    image_index: int
    kind: str
    question: str
    expected: str


def workload(scenes: list[iw.Scene], rng: random.Random, identification: int = 2, others: int = 3) -> list[Request]:
    requests = []
    for index, scene in enumerate(scenes):
        colours = [o.colour for o in scene.objects]
        asks = [(q.format(c=o.colour), o.shape) for o in scene.objects if colours.count(o.colour) == 1
                for q in ABOUT_A_COLOUR]
        if len(scene.objects) == 1:
            asks += [(q, scene.objects[0].shape) for q in ABOUT_THE_OBJECT]
        for question, shape in rng.sample(asks, min(identification, len(asks))):
            requests.append(Request(index, "identification", question, shape))
        for question, answer in rng.sample(iw.questions(scene), others):
            requests.append(Request(index, _family(question), question, answer))
    rng.shuffle(requests)
    return requests


def _family(question: str) -> str:
    if question.startswith("describe"):
        return "caption"
    return {"how many": "counting", "what color": "colour", "what size": "size",
            "what shape": "shape (spec)", "is there": "yes/no"}[" ".join(question.split()[:2])]


def heavy_only(runtime: CoCaModel, image, question: str) -> tuple[str, str, float]:
    return runtime.answer(image, [Turn(question)]).text, "decoder", 0.0


def routed(runtime: CoCaModel, router: StagedRouter, image, question: str) -> tuple[str, str, float]:
    """(answer, route, seconds spent deciding)"""
    features = runtime.encode_images([image])[0]
    start = time.perf_counter()
    decision = router.decide([features], question)
    decide_s = time.perf_counter() - start
    if decision.finished:
        return decision.answer, decision.route, decide_s
    prompt = runtime.prompt_ids([Turn(question)])
    return runtime.complete([features], [prompt])[0].text, decision.route, decide_s


def _timed(fn, *args) -> tuple[str, str, float, float]:
    start = time.perf_counter()
    answer, route, decide_s = fn(*args)
    return answer, route, decide_s, time.perf_counter() - start


def run(n_images: int, seed: int, settings: Settings) -> tuple[list[dict], dict]:
    runtime = CoCaModel.from_dir(settings.model)
    t0 = time.perf_counter()
    router = StagedRouter.build(settings, runtime, [runtime.name])
    load_s = time.perf_counter() - t0
    cold_intents = IntentClassifier(router.intents.embedder, router.intents.data, cache_size=0)
    cold = StagedRouter.build(settings, runtime, [runtime.name], intents=cold_intents)
    items = iw.make_eval_set(n_images, seed=seed)
    images = [image for image, _ in items]
    requests = workload([scene for _, scene in items], random.Random(seed))
    for request in requests[:4]:  # warm every path: first calls pay for allocations
        heavy_only(runtime, images[request.image_index], request.question)
        routed(runtime, cold, images[request.image_index], request.question)
    router.intents.cache_hits = router.intents.cache_misses = 0
    router.intents._cache.clear()  # the workload starts with nothing remembered
    rows = []
    for i, request in enumerate(requests):
        image = images[request.image_index]
        ways = [("heavy", heavy_only, (runtime, image, request.question)),
                ("routed", routed, (runtime, router, image, request.question)),
                ("cold", routed, (runtime, cold, image, request.question))]
        row = {"kind": request.kind, "question": request.question, "expected": request.expected}
        for name, fn, args in ways[i % 3:] + ways[:i % 3]:
            answer, route, decide_s, seconds = _timed(fn, *args)
            row |= {f"{name}_answer": answer, f"{name}_ok": answer.strip() == request.expected,
                    f"{name}_s": seconds, f"{name}_decide_s": decide_s, f"{name}_route": route}
        assert row["routed_route"] == row["cold_route"], "the intent cache changed a decision"
        row["route"] = row["routed_route"]
        rows.append(row)
    hits, misses = router.intents.cache_hits, router.intents.cache_misses
    return rows, {"router_load_s": load_s, "model": runtime.name, "intent_cache_hit_rate": hits / (hits + misses)}


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    heavy_acc = sum(r["heavy_ok"] for r in rows) / n
    routed_acc = sum(r["routed_ok"] for r in rows) / n
    heavy_ms = 1000 * statistics.fmean(r["heavy_s"] for r in rows)
    routed_ms = 1000 * statistics.fmean(r["routed_s"] for r in rows)
    cold_ms = 1000 * statistics.fmean(r["cold_s"] for r in rows)
    stage1 = [r for r in rows if r["route"] == "stage1"]
    share = len(stage1) / n
    # What stage 1 would save with a slower decoder: it skips the decode on `share` of the requests
    # and costs its decision on all of them, so it pays for itself once a decode (image encode
    # excluded) takes longer than this.
    overhead_cold_ms = 1000 * statistics.fmean(r["cold_decide_s"] for r in rows)
    return {"requests": n, "stage1_share": round(share, 4),
            "accuracy_vs_heavy_only": round(routed_acc / heavy_acc, 4),
            "latency_saved_fraction": round(1 - routed_ms / heavy_ms, 4),
            "heavy_only_accuracy": round(heavy_acc, 4), "routed_accuracy": round(routed_acc, 4),
            "latency_saved_fraction_cold": round(1 - cold_ms / heavy_ms, 4),
            "heavy_only_mean_ms": round(heavy_ms, 2), "routed_mean_ms": round(routed_ms, 2),
            "routed_cold_mean_ms": round(cold_ms, 2),
            "router_decide_mean_ms": round(1000 * statistics.fmean(r["routed_decide_s"] for r in rows), 2),
            "router_decide_cold_mean_ms": round(overhead_cold_ms, 2),
            "break_even_decode_ms_cold": round(overhead_cold_ms / share, 1) if share else None,
            "stage1_accuracy": round(sum(r["routed_ok"] for r in stage1) / len(stage1), 4) if stage1 else None,
            "heavy_only_accuracy_on_stage1_requests":
                round(sum(r["heavy_ok"] for r in stage1) / len(stage1), 4) if stage1 else None}


def by_kind(rows: list[dict]) -> list[dict]:
    table_rows = []
    for kind in sorted({r["kind"] for r in rows}):
        group = [r for r in rows if r["kind"] == kind]
        table_rows.append({
            "kind": kind, "requests": len(group),
            "stage1 share": sum(r["route"] == "stage1" for r in group) / len(group),
            "heavy acc": sum(r["heavy_ok"] for r in group) / len(group),
            "routed acc": sum(r["routed_ok"] for r in group) / len(group),
            "heavy ms": 1000 * statistics.fmean(r["heavy_s"] for r in group),
            "routed ms": 1000 * statistics.fmean(r["routed_s"] for r in group),
            "routed cold ms": 1000 * statistics.fmean(r["cold_s"] for r in group)})
    return table_rows


def by_route(rows: list[dict]) -> list[dict]:
    return [{"route": route, "requests": len(group := [r for r in rows if r["route"] == route]),
             "routed acc": sum(r["routed_ok"] for r in group) / len(group),
             "heavy acc on these": sum(r["heavy_ok"] for r in group) / len(group),
             "routed ms": 1000 * statistics.fmean(r["routed_s"] for r in group),
             "routed cold ms": 1000 * statistics.fmean(r["cold_s"] for r in group),
             "heavy ms on these": 1000 * statistics.fmean(r["heavy_s"] for r in group)}
            for route in sorted({r["route"] for r in rows})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 images instead of 120 (a minute or two here)")
    parser.add_argument("--images", type=int, default=None, help="images in the workload (5 requests each)")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both paths (1: steadier figures on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings.from_env()
    t0 = time.perf_counter()
    rows, info = run(args.images or (30 if args.quick else 120), args.seed, settings)
    summary = summarise(rows)
    wrong_stage1 = [f"{r['question']!r}: stage 1 said {r['routed_answer']!r}, truth {r['expected']!r}"
                    for r in rows if r["route"] == "stage1" and not r["routed_ok"]]
    sections = [
        ("Routed vs heavy-only (demo model, independent renderer, exact match)", table([
            {"way": "heavy-only", "accuracy": summary["heavy_only_accuracy"], "mean ms": summary["heavy_only_mean_ms"]},
            {"way": "routed", "accuracy": summary["routed_accuracy"], "mean ms": summary["routed_mean_ms"],
             "stage1 share": summary["stage1_share"], "latency saved": summary["latency_saved_fraction"]},
            {"way": "routed, cold (every prompt embedded)", "accuracy": summary["routed_accuracy"],
             "mean ms": summary["routed_cold_mean_ms"], "stage1 share": summary["stage1_share"],
             "latency saved": summary["latency_saved_fraction_cold"]},
            {"way": "routed / heavy-only", "accuracy": summary["accuracy_vs_heavy_only"]}])
         + f"\n\nIntent cache hit rate over the workload: {info['intent_cache_hit_rate']:.3f}. "
         f"The router's decision takes {summary['router_decide_mean_ms']:.1f} ms a request on average, "
         f"{summary['router_decide_cold_mean_ms']:.1f} ms cold (MiniLM on every prompt); cold, it pays for "
         f"itself once a decode takes more than {summary['break_even_decode_ms_cold']} ms."),
        ("By question kind", table(by_kind(rows))),
        ("By route", table(by_route(rows))
         + (f"\n\nStage-1 answers that were wrong: {len(wrong_stage1)}" + "".join(f"\n- {w}" for w in wrong_stage1[:5]))),
    ]
    summary |= {"images": args.images or (30 if args.quick else 120), "threads": args.threads,
                "zero_shot_threshold": settings.router_zero_shot_threshold,
                "min_intent_margin": settings.router_min_intent_margin,
                "router_load_s": round(info["router_load_s"], 1),
                "intent_cache_hit_rate": round(info["intent_cache_hit_rate"], 4), "quick": args.quick,
                "seconds": round(time.perf_counter() - t0, 1)}
    publish("router", command_line(), summary, sections)


if __name__ == "__main__":
    main()
