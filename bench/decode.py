"""`python -m bench.decode [--quick]`: the decode engine against its peers, each ratio measured in one run.

1. Batch captioning: coca_ViT-B-32 (random weights), greedy, 32 new tokens per image, images/s from
   pixels to tokens, vs open_clip's own `CoCa.generate` (top_k=1) on the same images and settings.
2. Chat serving: a 126M-parameter Mllama (12 x 768, GQA 12/4, vocab 32k), requests with prompt and
   output lengths from one seeded distribution, 16 in flight, vs transformers `generate` one request
   at a time and in left-padded batches of 16 (whose rows run to the batch's longest output; only the
   tokens each request asked for count).

Every system runs in fp32 and in bf16 (weights and activations, vision towers included); mmserve's
figure is its default (`dtype=auto`: bf16 on a CPU with native bf16, llm/hardware.py), and each ratio
is taken against the peer's faster dtype here. open_clip gets the same images as mmserve.
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
import functools
import os
import random
import time
from dataclasses import dataclass

import torch

from bench import bandwidth
from bench.models import (BOS, EOS, EOT, MLLAMA_TILE, PAD, SOT, open_clip_generate_available, random_coca_b32,
                          random_mllama, random_pictures)
from bench.report import command_line, publish, table
from llm.engine import Engine, EngineConfig, ImageInput, tensor_digest
from llm.hardware import resolve_dtype
from llm.kv_cache import bytes_per_token
from llm.packed_linear import dense_copy, pack_linears, weight_bytes
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
    per_block = bytes_per_token(engine.model.kv_shape, engine.runner.kv_dtype) * engine.config.block_size
    return (peak["blocks"] * per_block + peak["cross"]) / MiB


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT = str(resolve_dtype("auto")).removeprefix("torch.")  # what mmserve serves in here


def _faster(runs: dict[str, list[float]], system: str) -> tuple[str, float]:
    """(dtype, best figure) of `system`'s faster dtype; runs are keyed "system/dtype"."""
    best = {d: max(runs[f"{system}/{d}"]) for d in DTYPES}
    dtype = max(best, key=best.get)
    return dtype, best[dtype]


# -- 1. batch captioning --------------------------------------------------------------------------

def _ours_caption(tower, decoder, pixels: torch.Tensor, new_tokens: int, cross_bytes: int
                  ) -> tuple[float, dict, Engine, dict]:
    """Pixels to tokens: the vision tower (packed, as app/runtime.py runs it), then the engine over
    every image at once. The engine is a fresh one (no image K/V or prefix from an earlier run), made
    before the clock starts, as a server's is (allocating its KV pool is start-up work)."""
    n_ours = pixels.shape[0]
    engine = Engine(decoder, None, (EOT,), EngineConfig(max_num_seqs=64, max_num_batched_tokens=1024,
                                                        kv_cache_bytes=256 * MiB, cross_cache_bytes=cross_bytes))
    step, peak = _peak_tracker(engine)
    start = time.perf_counter()
    dtype = next(tower.parameters()).dtype
    with torch.inference_mode():
        embs = torch.cat([tower(pixels[i:i + 16].to(dtype))[1] for i in range(0, n_ours, 16)])
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


def bench_captioning(n_images: int, repeats: int, new_tokens: int = 32) -> dict:
    """Each system's best of `repeats` runs in each dtype, the two systems' runs interleaved (see
    bench_bandwidth on this VM's noise); open_clip captions the same `n_images` images as mmserve. One
    dtype's models at a time: the machine is shared and its memory is not ours alone."""
    model, cfg = random_coca_b32()
    from llm.models.coca import decoder_from_open_clip

    torch.manual_seed(1)
    pixels = torch.randn(n_images, 3, 224, 224)
    open_clip_generate_available()
    runs: dict[str, list[float]] = {f"{s}/{d}": [] for s in ("ours", "open_clip") for d in DTYPES}
    tokens: dict[str, object] = {}
    for d, dtype in DTYPES.items():
        model.to(dtype)  # open_clip's own model in this dtype (fp32 first: converted in place after)
        decoder = decoder_from_open_clip(cfg, model.state_dict()).to(dtype)
        tower = copy.deepcopy(model.visual).eval()
        pack_linears(tower)  # as app/models/families/coca.py runs it (a no-op in bf16)
        with torch.inference_mode():
            n_tok = tower(pixels[:1].to(dtype))[1].shape[1]
        cross_bytes = bytes_per_token(decoder.cross_kv_shape, dtype) * n_tok * n_images
        for _ in range(repeats):
            ours_s, ours, engine, peak = _ours_caption(tower, decoder, pixels, new_tokens, cross_bytes)
            runs[f"ours/{d}"].append(n_images / ours_s)
            if d == DEFAULT:
                kv_peak, kv_pool = _kv_peak_mib(engine, peak), engine.runner.kv_pool_bytes / MiB
            del engine
            start = time.perf_counter()
            with torch.inference_mode():  # seq_len counts the start token and the forced final end token
                ref = model.generate(pixels.to(dtype), seq_len=new_tokens + 2, generation_type="top_k",
                                     top_k=1, min_seq_len=new_tokens + 1)
            runs[f"open_clip/{d}"].append(n_images / (time.perf_counter() - start))
            tokens[f"ours/{d}"], tokens[f"open_clip/{d}"] = ours, ref
        del decoder, tower

    def agreement(d: str) -> float:  # greedy tokens equal to open_clip's in the same dtype, position by position
        ours, ref = tokens[f"ours/{d}"], tokens[f"open_clip/{d}"]
        pairs = [(a, b) for i in range(n_images) for a, b in zip(ours[f"img{i}"], ref[i, 1:new_tokens + 1].tolist())]
        return sum(a == b for a, b in pairs) / len(pairs)

    ref_dtype, ref_best = _faster(runs, "open_clip")
    ours_best = {d: max(runs[f"ours/{d}"]) for d in DTYPES}
    return {"images": n_images, "ours_dtype": DEFAULT, "ours_images_per_s": ours_best[DEFAULT],
            "ours_images_per_s_by_dtype": ours_best, "open_clip_images_per_s_by_dtype":
                {d: max(runs[f"open_clip/{d}"]) for d in DTYPES},
            "open_clip_faster_dtype": ref_dtype, "open_clip_images_per_s": ref_best,
            "speedup": ours_best[DEFAULT] / ref_best, "bf16_vs_fp32": ours_best["bfloat16"] / ours_best["float32"],
            "runs": {k: [round(x, 3) for x in v] for k, v in runs.items()},
            "token_agreement": {d: agreement(d) for d in DTYPES}, "kv_peak_mib": kv_peak, "kv_pool_mib": kv_pool}


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
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        model.generate(**inputs, do_sample=False, max_new_tokens=longest, min_new_tokens=longest,
                       eos_token_id=EOS, pad_token_id=PAD)
    return time.perf_counter() - start


def _ours_serve(decoder, encoder, requests: list[ChatRequest], in_flight: int) -> tuple[float, Engine, dict]:
    """Clients keep `in_flight` requests open; each new one is encoded (vision) and added when one ends."""
    engine = Engine(decoder, None, (EOS,), EngineConfig(max_num_seqs=in_flight, max_num_batched_tokens=512,
                                                        kv_cache_bytes=256 * MiB))
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


def bench_chat(n_ours: int, n_sequential: int, n_batched: int, models: dict, repeats: int) -> dict:
    """Each system's best of `repeats` runs in each dtype (`models`: dtype -> (hf, decoder, encoder)),
    the runs interleaved."""
    hf, decoder, _ = models["float32"]
    image_token = hf.config.image_token_index
    requests = chat_workload(n_ours, decoder.vocab_size, image_token)
    seq, batched = requests[:n_sequential], requests[:n_batched]
    runs: dict[str, list[float]] = {f"{s}/{d}": [] for s in ("ours", "sequential", "batched") for d in DTYPES}
    for _ in range(repeats):
        for d in DTYPES:
            hf, decoder, encoder = models[d]
            ours_s, engine, peak = _ours_serve(decoder, encoder, requests, in_flight=16)
            runs[f"ours/{d}"].append(sum(r.new_tokens for r in requests) / ours_s)
            if d == DEFAULT:
                kv_peak, kv_pool = _kv_peak_mib(engine, peak), engine.runner.kv_pool_bytes / MiB
            del engine
            seq_s = sum(_hf_generate(hf, encoder, [r], image_token) for r in seq)
            runs[f"sequential/{d}"].append(sum(r.new_tokens for r in seq) / seq_s)
            bat_s = sum(_hf_generate(hf, encoder, batched[i:i + 16], image_token) for i in range(0, len(batched), 16))
            runs[f"batched/{d}"].append(sum(r.new_tokens for r in batched) / bat_s)
    ours = {d: max(runs[f"ours/{d}"]) for d in DTYPES}
    (seq_dtype, seq_tps), (bat_dtype, bat_tps) = _faster(runs, "sequential"), _faster(runs, "batched")
    return {"runs_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
            "requests_ours": n_ours, "ours_dtype": DEFAULT, "ours_tokens_per_s": ours[DEFAULT],
            "ours_tokens_per_s_by_dtype": ours, "bf16_vs_fp32": ours["bfloat16"] / ours["float32"],
            "hf_sequential_requests": n_sequential, "hf_sequential_tokens_per_s": seq_tps,
            "hf_sequential_dtype": seq_dtype, "hf_batched_requests": n_batched, "hf_batched_tokens_per_s": bat_tps,
            "hf_batched_dtype": bat_dtype,
            "hf_tokens_per_s_by_dtype": {k: max(v) for k, v in runs.items() if not k.startswith("ours")},
            "speedup_vs_sequential": ours[DEFAULT] / seq_tps, "speedup_vs_batched": ours[DEFAULT] / bat_tps,
            "kv_peak_mib": kv_peak, "kv_pool_mib": kv_pool}


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
    return (weights + bytes_per_token(decoder.kv_shape, dtype) * context
            + bytes_per_token(decoder.cross_kv_shape, dtype) * image_tokens)


def bench_bandwidth(models: dict, new_tokens: int, repeats: int, compiled: bool = True) -> dict:
    """Fraction of the bound per run, each run's tokens/s over the bandwidth measured just before and
    after it (the higher of the two): this VM's memory bandwidth and step times swing by +-20% from
    one minute to the next, and pairing each run with its own ceiling cancels most of that. Each
    system's best of `repeats` runs (as timeit reports), the runs interleaved, in each dtype (the bytes
    per token are that dtype's). mmserve runs with `compile_decode` (its setting for latency; the first
    run, which compiles, is timed apart and not counted; `compiled` False: not at all) and without it."""
    hf, decoder, encoder = models["float32"]
    image_token = hf.config.image_token_index
    prompt = [BOS, image_token, *range(10, 74)]
    features = encoder.encode(random_pictures(1, 7))[0]
    image = ImageInput.from_features(features)
    per_token = {d: _decode_bytes_per_token(models[d][1], features.attended_tokens, len(prompt) + new_tokens // 2)
                 for d in DTYPES}

    def ours(decoder, compile_decode: bool) -> float:
        engine = Engine(decoder, None, (EOS,), EngineConfig(max_num_seqs=1, kv_cache_bytes=64 * MiB,
                                                            compile_decode=compile_decode))
        engine.add_request("one", prompt, image, SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True))
        engine.step()  # prefill + first token
        start = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
        return new_tokens / (time.perf_counter() - start)

    def theirs(hf, encoder) -> float:
        one = _hf_generate(hf, encoder, [ChatRequest(prompt, 1, 7)], image_token)
        full = _hf_generate(hf, encoder, [ChatRequest(prompt, new_tokens + 1, 7)], image_token)
        return new_tokens / max(1e-9, full - one)

    compile_s = {}
    for d in DTYPES if compiled else ():
        start = time.perf_counter()
        ours(models[d][1], True)  # compiles the decode step (a fresh engine's pool: every later run the same shape)
        compile_s[d] = round(time.perf_counter() - start, 1)
    systems = {}
    for d in DTYPES:
        hf, decoder, encoder = models[d]
        if compiled:
            systems[f"ours/{d}"] = functools.partial(ours, decoder, True)
        systems |= {f"ours_eager/{d}": functools.partial(ours, decoder, False),
                    f"hf/{d}": functools.partial(theirs, hf, encoder)}
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, run in systems.items():
            before = bandwidth.streaming_read()
            tps = run()
            ceiling = max(before, bandwidth.streaming_read())  # bytes/s
            runs[name].append({"tokens_per_s": tps, "gb_s": ceiling / 1e9, "matvec_gb_s": bandwidth.matvec() / 1e9,
                               "fraction": tps * per_token[name.split("/")[1]] / ceiling})
    best = {name: max(rs, key=lambda r: r["fraction"]) for name, rs in runs.items()}
    return {"best": best, "bytes_per_token_mb": {d: b / 1e6 for d, b in per_token.items()}, "repeats": repeats,
            "compile_first_run_s": compile_s,
            "runs": {name: [{k: round(v, 3) for k, v in r.items()} for r in rs] for name, rs in runs.items()}}


def load_mllama() -> dict:
    """dtype -> (transformers' model, our decoder, our vision encoder), the same random weights."""
    from llm.models.mllama import mllama_decoder_from_hf_model
    from vision.encoders.mllama import MllamaPreprocessCfg, MllamaVisionEncoder

    hf = random_mllama()
    encoder = MllamaVisionEncoder.from_hf_model(copy.deepcopy(hf), MllamaPreprocessCfg(
        tile_size=MLLAMA_TILE, max_image_tiles=4, image_mean=(0.5,) * 3, image_std=(0.5,) * 3))
    models = {}
    for d, dtype in DTYPES.items():
        theirs = hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype)
        models[d] = (theirs, mllama_decoder_from_hf_model(hf, max_context=2048, dtype=dtype), encoder.to(dtype))
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts, same ratios")
    args = parser.parse_args()
    q = args.quick
    t0 = time.perf_counter()
    cap = bench_captioning(n_images=16 if q else 64, repeats=2 if q else 3)
    # each section's figures as it ends: on a crowded machine a run may not live to the end
    print(f"captioning done in {time.perf_counter() - t0:.0f} s: {cap['runs']}", flush=True)
    models = load_mllama()
    chat = bench_chat(n_ours=24 if q else 64, n_sequential=3 if q else 12, n_batched=16 if q else 32, models=models,
                      repeats=2 if q else 3)
    print(f"chat done in {time.perf_counter() - t0:.0f} s: {chat['runs_tokens_per_s']}", flush=True)
    turns = bench_multiturn(models[DEFAULT], repeats=2 if q else 5)
    # quick: no compile_decode rows (two compiles take minutes on a shared 2-core machine)
    bw = bench_bandwidth(models, new_tokens=48 if q else 128, repeats=2 if q else 3, compiled=not q)
    print(f"all done in {time.perf_counter() - t0:.0f} s", flush=True)
    load = os.getloadavg()
    by = lambda figures: " / ".join(f"{figures[d]:.3g}" for d in DTYPES)  # noqa: E731
    sections = [
        ("Batch captioning (coca_ViT-B-32, 32 new tokens, images/s incl. the vision tower)", table([
            {"system": "mmserve", "images": cap["images"], "images/s fp32 / bf16": by(cap["ours_images_per_s_by_dtype"]),
             "KV peak MiB": cap["kv_peak_mib"]},
            {"system": "open_clip CoCa.generate", "images": cap["images"],
             "images/s fp32 / bf16": by(cap["open_clip_images_per_s_by_dtype"])},
            {"system": f"speedup (mmserve {cap['ours_dtype']} / open_clip {cap['open_clip_faster_dtype']})",
             "images/s fp32 / bf16": f"{cap['speedup']:.3g}"}])
         + f"\n\nGreedy tokens equal to open_clip's in the same dtype, position by position: "
           f"{cap['token_agreement']}. mmserve bf16 / fp32: {cap['bf16_vs_fp32']:.2f}x. Best of "
           f"{len(cap['runs']['ours/float32'])} interleaved runs each (images/s of every run: {cap['runs']})."),
        ("Chat serving (126M Mllama, 16 in flight, tokens/s)", table([
            {"system": "mmserve", "requests": chat["requests_ours"],
             "tokens/s fp32 / bf16": by(chat["ours_tokens_per_s_by_dtype"]), "KV peak MiB": chat["kv_peak_mib"]},
            {"system": "transformers, one at a time", "requests": chat["hf_sequential_requests"],
             "tokens/s fp32 / bf16": by({d: chat["hf_tokens_per_s_by_dtype"][f"sequential/{d}"] for d in DTYPES})},
            {"system": "transformers, padded batches of 16", "requests": chat["hf_batched_requests"],
             "tokens/s fp32 / bf16": by({d: chat["hf_tokens_per_s_by_dtype"][f"batched/{d}"] for d in DTYPES})},
            {"system": f"speedup vs one at a time ({chat['ours_dtype']} / {chat['hf_sequential_dtype']})",
             "tokens/s fp32 / bf16": f"{chat['speedup_vs_sequential']:.3g}"},
            {"system": f"speedup vs batches of 16 ({chat['ours_dtype']} / {chat['hf_batched_dtype']})",
             "tokens/s fp32 / bf16": f"{chat['speedup_vs_batched']:.3g}"},
            {"system": "mmserve bf16 / fp32", "tokens/s fp32 / bf16": f"{chat['bf16_vs_fp32']:.3g}"}])
         + f"\n\nBest of {len(chat['runs_tokens_per_s']['ours/float32'])} interleaved runs each (tokens/s of every "
           f"run: {chat['runs_tokens_per_s']})."),
        (f"Multi-turn: second-turn time to first token ({DEFAULT})", table([
            {"turn 2 prompt tokens": turns["turn2_prompt_tokens"], "warm (reuse) ms": turns["warm_ttft_ms"],
             "cold ms": turns["cold_ttft_ms"], "ratio": turns["ratio"]}])),
        ("Single-stream decode vs the memory-bandwidth bound", table([
            {"system": f"{label}, {d}", "tok/s": bw["best"][f"{name}/{d}"]["tokens_per_s"],
             "read GB/s (its run)": bw["best"][f"{name}/{d}"]["gb_s"],
             "matvec GB/s": bw["best"][f"{name}/{d}"]["matvec_gb_s"],
             "bound tok/s": bw["best"][f"{name}/{d}"]["gb_s"] * 1e3 / bw["bytes_per_token_mb"][d],
             "fraction": bw["best"][f"{name}/{d}"]["fraction"]}
            for d in DTYPES for name, label in (("ours", "mmserve, compile_decode"), ("ours_eager", "mmserve, eager"),
                                               ("hf", "transformers")) if f"{name}/{d}" in bw["best"]])
         + f"\n\nBytes read per token (weights without the embedding table, self and image K/V): "
           f"{by(bw['bytes_per_token_mb'])} MB (fp32 / bf16). The ceiling is a streaming read of 1 GiB on all threads "
           f"(bench/bandwidth.py), measured just before and after each run (the higher); an 8192^2 fp32 matvec's "
           f"read rate beside it. Best of {bw['repeats']} interleaved runs per system. The first compile_decode "
           f"run per dtype, which compiles the step, took {bw['compile_first_run_s']} s and is not counted. "
           f"Every run: {bw['runs']}."),
    ]
    summary = {"dtype": DEFAULT,
               "captioning_speedup_vs_open_clip": round(cap["speedup"], 2),
               "captioning_bf16_vs_fp32": round(cap["bf16_vs_fp32"], 2),
               "chat_speedup_vs_hf_sequential": round(chat["speedup_vs_sequential"], 2),
               "chat_speedup_vs_hf_batched": round(chat["speedup_vs_batched"], 2),
               "bf16_chat_speedup": round(chat["bf16_vs_fp32"], 2),
               "multiturn_ttft_ratio": round(turns["ratio"], 3),
               "bandwidth_fraction": {d: round(max(r["fraction"] for n, r in bw["best"].items()
                                                   if n in (f"ours/{d}", f"ours_eager/{d}")), 3) for d in DTYPES},
               "eager_bandwidth_fraction": {d: round(bw["best"][f"ours_eager/{d}"]["fraction"], 3) for d in DTYPES},
               "hf_bandwidth_fraction": {d: round(bw["best"][f"hf/{d}"]["fraction"], 3) for d in DTYPES},
               "single_stream_tokens_per_s": {d: round(max(r["tokens_per_s"] for n, r in bw["best"].items()
                                                           if n in (f"ours/{d}", f"ours_eager/{d}")), 1)
                                              for d in DTYPES},
               "kv_peak_mib": {"captioning": round(cap["kv_peak_mib"], 1), "chat": round(chat["kv_peak_mib"], 1)},
               "load_average_at_end": [round(x, 1) for x in load],
               "quick": q, "seconds": round(time.perf_counter() - t0, 1)}
    publish("decode", command_line(), summary, sections)


if __name__ == "__main__":
    main()
