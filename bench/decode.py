"""`python -m bench.decode [--quick]`: the decode engine against its peers, each ratio measured in one run.

1. Batch captioning: coca_ViT-B-32 (random weights), greedy, 32 new tokens per image, images/s from
   pixels to tokens, vs open_clip's own `CoCa.generate` (top_k=1) on the same images and settings.
2. Chat serving: a 126M-parameter Mllama (12 x 768, GQA 12/4, vocab 32k), requests with prompt and
   output lengths from one seeded distribution, 16 in flight, vs transformers `generate` one request
   at a time and in left-padded batches of 16 (whose rows run to the batch's longest output; only the
   tokens each request asked for count).
3. Multi-turn: time to first token of a second turn with prefix-block, image K/V and feature reuse,
   vs the same turn on a cold engine (image encoded, image K/V and the whole prompt computed).
4. Against the physical limit: single-stream decode tokens/s vs the memory-bandwidth bound, bytes
   read per token (weights + KV) over the memory bandwidth in the same run: a streaming read of 1 GiB on
   all threads (bench/bandwidth.py; what a large matrix-vector product reaches is reported beside);
   mmserve with `compile_decode` (its latency setting) and without, transformers for reference.

Lengths are forced on both sides (random weights emit end tokens anywhere): ignore_eos for us,
min_new_tokens for transformers and open_clip.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from dataclasses import dataclass

import torch

from bench import bandwidth
from bench.models import (BOS, EOS, EOT, MLLAMA_TILE, PAD, SOT, open_clip_generate_available, random_coca_b32,
                          random_mllama, random_pictures)
from bench.report import command_line, publish, table
from llm.engine import Engine, EngineConfig, ImageInput, tensor_digest
from llm.packed_linear import pack_linears, weight_bytes
from llm.params import SamplingParams

MiB = 1 << 20


def _peak_tracker(engine: Engine):
    peak = {"blocks": 0, "cross": 0}

    def step():
        outs = engine.step()
        peak["blocks"] = max(peak["blocks"], engine.scheduler.block_manager.num_used_blocks)
        peak["cross"] = max(peak["cross"], engine.runner.cross_pool.bytes)
        return outs
    return step, peak


def _kv_peak_mib(engine: Engine, peak: dict) -> float:
    shape, bs = engine.model.kv_shape, engine.config.block_size
    per_block = shape.elements_per_token * bs * engine.runner.k_pool[0].element_size()
    return (peak["blocks"] * per_block + peak["cross"]) / MiB


# -- 1. batch captioning --------------------------------------------------------------------------

def _ours_caption(tower, decoder, pixels: torch.Tensor, new_tokens: int) -> tuple[float, dict, Engine, dict]:
    """Pixels to tokens: the vision tower (packed, as app/runtime.py runs it), then the engine over
    every image at once. The engine is a fresh one (no image K/V or prefix from an earlier run), made
    before the clock starts, as a server's is (allocating its KV pool is start-up work)."""
    n_ours = pixels.shape[0]
    engine = Engine(decoder, None, (EOT,), EngineConfig(max_num_seqs=64, max_num_batched_tokens=1024,
                                                        kv_cache_bytes=256 * MiB, cross_cache_bytes=1 << 30))
    step, peak = _peak_tracker(engine)
    start = time.perf_counter()
    with torch.inference_mode():
        embs = torch.cat([tower(pixels[i:i + 16])[1] for i in range(0, n_ours, 16)])
    ids = [f"img{i}" for i in range(n_ours)]
    for i, request_id in enumerate(ids):
        engine.add_request(request_id, [SOT], ImageInput(tensor_digest(embs[i]), embs[i]),
                           SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    ours: dict[str, tuple] = {}
    while engine.has_unfinished:
        for out in step():
            if out.finished:
                ours[out.request_id] = out.token_ids
    return time.perf_counter() - start, ours, engine, peak


def bench_captioning(n_ours: int, n_ref: int, repeats: int, new_tokens: int = 32) -> dict:
    """Each side's best of `repeats` runs, the runs interleaved (see bench_bandwidth on this VM's noise)."""
    model, cfg = random_coca_b32()
    from llm.models.coca import decoder_from_open_clip

    decoder = decoder_from_open_clip(cfg, model.state_dict())
    tower = copy.deepcopy(model.visual).eval()  # open_clip's own model stays as it is, for its generate
    pack_linears(tower)
    torch.manual_seed(1)
    pixels = torch.randn(n_ours, 3, 224, 224)
    open_clip_generate_available()
    ours_runs, ref_runs = [], []
    for _ in range(repeats):
        ours_s, ours, engine, peak = _ours_caption(tower, decoder, pixels, new_tokens)
        ours_runs.append(n_ours / ours_s)
        start = time.perf_counter()
        with torch.inference_mode():  # seq_len counts the start token and the forced final end token
            ref = model.generate(pixels[:n_ref], seq_len=new_tokens + 2, generation_type="top_k", top_k=1,
                                 min_seq_len=new_tokens + 1)
        ref_runs.append(n_ref / (time.perf_counter() - start))
    same = all(list(ours[f"img{i}"]) == ref[i, 1:new_tokens + 1].tolist() for i in range(n_ref))
    return {"images_ours": n_ours, "images_open_clip": n_ref, "ours_images_per_s": max(ours_runs),
            "open_clip_images_per_s": max(ref_runs), "speedup": max(ours_runs) / max(ref_runs),
            "ours_runs": [round(x, 2) for x in ours_runs], "open_clip_runs": [round(x, 3) for x in ref_runs],
            "tokens_identical": same, "kv_peak_mib": _kv_peak_mib(engine, peak),
            "kv_pool_mib": engine.runner.kv_pool_bytes / MiB}


# -- 2. chat serving -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatRequest:
    prompt: list[int]
    new_tokens: int
    picture_seed: int


def chat_workload(n: int, vocab: int, image_token: int, seed: int = 0) -> list[ChatRequest]:
    """What a chat service sees: a system-ish preamble plus a user turn (32-256 tokens), answers of
    16-128 tokens, one image each."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = [rng.randrange(4, vocab) for _ in range(rng.randint(32, 256))]
        out.append(ChatRequest([BOS, image_token, *text], rng.randint(16, 128), seed * 1000 + i))
    return out


def _hf_inputs(encoder, pictures, prompts: list[list[int]], image_token: int) -> dict:
    """What MllamaProcessor gives transformers for left-padded rows: pixels, aspect ratios, masks."""
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), PAD)
    attention = torch.zeros((len(prompts), longest), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = torch.tensor(p)
        attention[r, longest - len(p):] = 1
    inputs = encoder.preprocess(pictures)
    spans = [get_cross_attention_token_mask(row.tolist(), image_token) for row in ids]
    mask = convert_sparse_cross_attention_mask_to_dense(spans, inputs["num_tiles"], encoder.preprocess_cfg.max_image_tiles,
                                                        longest)
    return {"input_ids": ids, "attention_mask": attention, "pixel_values": inputs["pixel_values"],
            "aspect_ratio_ids": inputs["aspect_ratio_ids"], "aspect_ratio_mask": inputs["aspect_ratio_mask"],
            "cross_attention_mask": torch.from_numpy(mask)}


def _hf_generate(model, encoder, requests: list[ChatRequest], image_token: int) -> float:
    """Seconds for one padded transformers generate over `requests`; every row runs to the longest."""
    pictures = [random_pictures(1, r.picture_seed)[0] for r in requests]
    longest = max(r.new_tokens for r in requests)
    start = time.perf_counter()
    inputs = _hf_inputs(encoder, pictures, [r.prompt for r in requests], image_token)
    with torch.inference_mode():
        model.generate(**inputs, do_sample=False, max_new_tokens=longest, min_new_tokens=longest,
                       eos_token_id=EOS, pad_token_id=PAD)
    return time.perf_counter() - start


def _ours_serve(decoder, encoder, requests: list[ChatRequest], in_flight: int) -> tuple[float, Engine, dict]:
    """Clients keep `in_flight` requests open; each new one is encoded (vision) and added when one ends."""
    engine = Engine(decoder, None, (EOS,), EngineConfig(max_num_seqs=in_flight, max_num_batched_tokens=512,
                                                        kv_cache_bytes=512 * MiB))
    step, peak = _peak_tracker(engine)
    queue = list(enumerate(requests))
    start = time.perf_counter()

    def admit():
        i, r = queue.pop(0)
        features = encoder.encode(random_pictures(1, r.picture_seed))[0]
        engine.add_request(f"chat{i}", r.prompt, ImageInput.from_features(features),
                           SamplingParams(max_tokens=r.new_tokens, ignore_eos=True))

    for _ in range(min(in_flight, len(queue))):
        admit()
    while engine.has_unfinished:
        for out in step():
            if out.finished and queue:
                admit()
    return time.perf_counter() - start, engine, peak


def bench_chat(n_ours: int, n_sequential: int, n_batched: int, models, repeats: int) -> dict:
    """Each system's best of `repeats` runs, the runs interleaved."""
    hf, decoder, encoder = models
    image_token = hf.config.image_token_index
    requests = chat_workload(n_ours, decoder.vocab_size, image_token)
    seq, batched = requests[:n_sequential], requests[:n_batched]
    runs: dict[str, list[float]] = {"ours": [], "sequential": [], "batched": []}
    for _ in range(repeats):
        ours_s, engine, peak = _ours_serve(decoder, encoder, requests, in_flight=16)
        runs["ours"].append(sum(r.new_tokens for r in requests) / ours_s)
        seq_s = sum(_hf_generate(hf, encoder, [r], image_token) for r in seq)
        runs["sequential"].append(sum(r.new_tokens for r in seq) / seq_s)
        bat_s = sum(_hf_generate(hf, encoder, batched[i:i + 16], image_token) for i in range(0, len(batched), 16))
        runs["batched"].append(sum(r.new_tokens for r in batched) / bat_s)
    ours_tps, seq_tps, bat_tps = (max(runs[k]) for k in ("ours", "sequential", "batched"))
    return {"runs_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
            "requests_ours": n_ours, "ours_tokens_per_s": ours_tps, "hf_sequential_requests": n_sequential,
            "hf_sequential_tokens_per_s": seq_tps, "hf_batched_requests": n_batched,
            "hf_batched_tokens_per_s": bat_tps, "speedup_vs_sequential": ours_tps / seq_tps,
            "speedup_vs_batched": ours_tps / bat_tps, "kv_peak_mib": _kv_peak_mib(engine, peak),
            "kv_pool_mib": engine.runner.kv_pool_bytes / MiB}


# -- 3. multi-turn time to first token --------------------------------------------------------------

def _ttft(engine: Engine, request_id: str, prompt: list[int], image: ImageInput, new_tokens: int) -> tuple[float, tuple]:
    start = time.perf_counter()
    engine.add_request(request_id, prompt, image, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    first, tokens = None, ()
    while engine.has_unfinished:
        for out in engine.step():
            if first is None:
                first = time.perf_counter() - start
            tokens = out.token_ids
    return first, tokens


def bench_multiturn(models, repeats: int) -> dict:
    """Time to first token of turn 2 = getting the image's features + prefill up to the first token."""
    hf, decoder, encoder = models
    image_token = hf.config.image_token_index
    rng = random.Random(5)
    turn1 = [BOS, image_token, *[rng.randrange(4, decoder.vocab_size) for _ in range(200)]]
    question = [rng.randrange(4, decoder.vocab_size) for _ in range(24)]
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=512, kv_cache_bytes=128 * MiB)
    warm_times, cold_times, same = [], [], []
    for rep in range(repeats):
        picture = random_pictures(1, 100 + rep)[0]
        features = encoder.encode([picture])[0]
        feature_cache = {"picture": ImageInput.from_features(features)}
        warm_engine = Engine(decoder, None, (EOS,), config)
        _, answer = _ttft(warm_engine, "t1", turn1, feature_cache["picture"], 32)
        turn2 = turn1 + list(answer) + question

        start = time.perf_counter()
        image = feature_cache["picture"]  # the vision stage's feature-cache hit
        image_s = time.perf_counter() - start
        warm, warm_tokens = _ttft(warm_engine, "t2", turn2, image, 4)
        warm_times.append(image_s + warm)

        cold_engine = Engine(decoder, None, (EOS,), config)
        start = time.perf_counter()
        f = encoder.encode([picture])[0]
        image = ImageInput.from_features(f)
        image_s = time.perf_counter() - start
        cold, cold_tokens = _ttft(cold_engine, "t2", turn2, image, 4)
        cold_times.append(image_s + cold)
        same.append(warm_tokens == cold_tokens)
    warm_t, cold_t = sorted(warm_times)[len(warm_times) // 2], sorted(cold_times)[len(cold_times) // 2]
    return {"turn2_prompt_tokens": len(turn2), "warm_ttft_ms": warm_t * 1e3, "cold_ttft_ms": cold_t * 1e3,
            "ratio": warm_t / cold_t, "same_tokens": all(same)}


# -- 4. bandwidth -----------------------------------------------------------------------------------

def _decode_bytes_per_token(decoder, image_tokens: int, context: int) -> float:
    """Weights read per token (the embedding table: one row) plus the KV read at this context, in the
    decoder's own dtype."""
    weights = weight_bytes(decoder, skip="embed")  # packed or not
    dtype = next(decoder.parameters()).dtype
    return (weights + decoder.kv_shape.bytes_per_token(dtype) * context
            + decoder.cross_kv_shape.bytes_per_token(dtype) * image_tokens)


def bench_bandwidth(models, new_tokens: int, repeats: int) -> dict:
    """Fraction of the bound per run, each run's tokens/s over the bandwidth measured just before and
    after it (the higher of the two): this VM's memory bandwidth and step times swing by +-20% from
    one minute to the next, and pairing each run with its own ceiling cancels most of that. Each
    system's best of `repeats` runs (as timeit reports), the runs interleaved. mmserve runs with
    `compile_decode` (its setting for latency; the first run, which compiles, is timed apart and not
    counted) and without it."""
    hf, decoder, encoder = models
    image_token = hf.config.image_token_index
    prompt = [BOS, image_token, *range(10, 74)]
    features = encoder.encode(random_pictures(1, 7))[0]
    image = ImageInput.from_features(features)
    bytes_per_token = _decode_bytes_per_token(decoder, features.attended_tokens, len(prompt) + new_tokens // 2)

    def ours(compile_decode: bool) -> float:
        engine = Engine(decoder, None, (EOS,), EngineConfig(max_num_seqs=1, kv_cache_bytes=64 * MiB,
                                                            compile_decode=compile_decode))
        engine.add_request("one", prompt, image, SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True))
        engine.step()  # prefill + first token
        start = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
        return new_tokens / (time.perf_counter() - start)

    def theirs() -> float:
        one = _hf_generate(hf, encoder, [ChatRequest(prompt, 1, 7)], image_token)
        full = _hf_generate(hf, encoder, [ChatRequest(prompt, new_tokens + 1, 7)], image_token)
        return new_tokens / max(1e-9, full - one)

    start = time.perf_counter()
    ours(True)  # compiles the decode step (a fresh engine's pool gives every later run the same step shape)
    compile_s = time.perf_counter() - start
    systems = {"ours": lambda: ours(True), "ours_eager": lambda: ours(False), "hf": theirs}
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, run in systems.items():
            before = bandwidth.streaming_read()
            tps = run()
            ceiling = max(before, bandwidth.streaming_read())  # bytes/s
            runs[name].append({"tokens_per_s": tps, "gb_s": ceiling / 1e9, "matvec_gb_s": bandwidth.matvec() / 1e9,
                               "fraction": tps * bytes_per_token / ceiling})
    best = {name: max(rs, key=lambda r: r["fraction"]) for name, rs in runs.items()}
    return {"best": best, "bytes_per_token_mb": bytes_per_token / 1e6, "repeats": repeats,
            "compile_first_run_s": compile_s,
            "runs": {name: [{k: round(v, 3) for k, v in r.items()} for r in rs] for name, rs in runs.items()}}


def load_mllama():
    from llm.models.mllama import mllama_decoder_from_hf_model
    from vision.encoders.mllama import MllamaPreprocessCfg, MllamaVisionEncoder

    hf = random_mllama()
    decoder = mllama_decoder_from_hf_model(hf, max_context=2048)
    encoder = MllamaVisionEncoder.from_hf_model(hf, MllamaPreprocessCfg(tile_size=MLLAMA_TILE, max_image_tiles=4,
                                                                        image_mean=(0.5,) * 3, image_std=(0.5,) * 3))
    return hf, decoder, encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, same ratios (< 5 minutes here)")
    args = parser.parse_args()
    q = args.quick
    t0 = time.perf_counter()
    cap = bench_captioning(n_ours=16 if q else 64, n_ref=4 if q else 16, repeats=2 if q else 3)
    print(f"captioning done in {time.perf_counter() - t0:.0f} s", flush=True)
    models = load_mllama()
    chat = bench_chat(n_ours=24 if q else 64, n_sequential=3 if q else 12, n_batched=16 if q else 32, models=models,
                      repeats=2 if q else 3)
    print(f"chat done in {time.perf_counter() - t0:.0f} s", flush=True)
    turns = bench_multiturn(models, repeats=2 if q else 5)
    bw = bench_bandwidth(models, new_tokens=48 if q else 128, repeats=2 if q else 3)
    print(f"all done in {time.perf_counter() - t0:.0f} s", flush=True)
    sections = [
        ("Batch captioning (coca_ViT-B-32, 32 new tokens, images/s incl. the vision tower)", table([
            {"system": "mmserve", "images": cap["images_ours"], "images/s": cap["ours_images_per_s"],
             "KV peak MiB": cap["kv_peak_mib"]},
            {"system": "open_clip CoCa.generate", "images": cap["images_open_clip"],
             "images/s": cap["open_clip_images_per_s"]},
            {"system": "speedup", "images/s": cap["speedup"]}])
         + f"\n\nGreedy tokens identical to open_clip's on the images both ran: {cap['tokens_identical']}. "
           f"Best of {len(cap['ours_runs'])} interleaved runs each (images/s of every run: mmserve {cap['ours_runs']}, "
           f"open_clip {cap['open_clip_runs']})."),
        ("Chat serving (126M Mllama, 16 in flight, tokens/s)", table([
            {"system": "mmserve", "requests": chat["requests_ours"], "tokens/s": chat["ours_tokens_per_s"],
             "KV peak MiB": chat["kv_peak_mib"]},
            {"system": "transformers, one at a time", "requests": chat["hf_sequential_requests"],
             "tokens/s": chat["hf_sequential_tokens_per_s"]},
            {"system": "transformers, padded batches of 16", "requests": chat["hf_batched_requests"],
             "tokens/s": chat["hf_batched_tokens_per_s"]},
            {"system": "speedup vs one at a time", "tokens/s": chat["speedup_vs_sequential"]},
            {"system": "speedup vs batches of 16", "tokens/s": chat["speedup_vs_batched"]}])
         + f"\n\nBest of {len(chat['runs_tokens_per_s']['ours'])} interleaved runs each (tokens/s of every run: "
           f"{chat['runs_tokens_per_s']})."),
        ("Multi-turn: second-turn time to first token", table([
            {"turn 2 prompt tokens": turns["turn2_prompt_tokens"], "warm (reuse) ms": turns["warm_ttft_ms"],
             "cold ms": turns["cold_ttft_ms"], "ratio": turns["ratio"]}])),
        ("Single-stream decode vs the memory-bandwidth bound", table([
            {"system": label, "tok/s": bw["best"][name]["tokens_per_s"], "read GB/s (its run)": bw["best"][name]["gb_s"],
             "matvec GB/s": bw["best"][name]["matvec_gb_s"],
             "bound tok/s": bw["best"][name]["gb_s"] * 1e3 / bw["bytes_per_token_mb"],
             "fraction": bw["best"][name]["fraction"]}
            for name, label in (("ours", "mmserve, compile_decode"), ("ours_eager", "mmserve, eager"),
                                ("hf", "transformers"))])
         + f"\n\nBytes read per token (weights without the embedding table, self and image K/V): "
           f"{bw['bytes_per_token_mb']:.0f} MB. Each run is paired with the bandwidth measured just before and "
           f"after it (the higher); best of {bw['repeats']} interleaved runs per system. The first compile_decode "
           f"run, which compiles the step, took {bw['compile_first_run_s']:.0f} s and is not counted. "
           f"Every run: {bw['runs']}."),
    ]
    summary = {"captioning_speedup_vs_open_clip": round(cap["speedup"], 2),
               "chat_speedup_vs_hf_sequential": round(chat["speedup_vs_sequential"], 2),
               "chat_speedup_vs_hf_batched": round(chat["speedup_vs_batched"], 2),
               "multiturn_ttft_ratio": round(turns["ratio"], 3),
               "bandwidth_fraction": round(bw["best"]["ours"]["fraction"], 3),
               "eager_bandwidth_fraction": round(bw["best"]["ours_eager"]["fraction"], 3),
               "hf_bandwidth_fraction": round(bw["best"]["hf"]["fraction"], 3),
               "kv_peak_mib": {"captioning": round(cap["kv_peak_mib"], 1), "chat": round(chat["kv_peak_mib"], 1)},
               "quick": q, "seconds": round(time.perf_counter() - t0, 1)}
    publish("decode", command_line(), summary, sections)


if __name__ == "__main__":
    main()
