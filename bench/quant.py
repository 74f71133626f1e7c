"""`python -m bench.quant [--quick]`: what quantization and structured pruning buy and cost, per scheme,
every ratio against fp32 measured in the same run.

Schemes: fp32, bf16, W8A16, W4A16 at group 32 / 64 / 128 (round-to-nearest), pruned 25% and 50%
(heads and MLP channels, bf16), and the best combination (pruned 25% + W4A16 g64). Per scheme:
1. weight bytes a decode step reads (llm.quant.quantized_bytes: the embedding table is one row a token);
2. single-stream decode tokens/s on the 126M Mllama of bench.decode, and the fraction of the scheme's
   own memory-bandwidth bound: tokens/s x (weight bytes + K/V read at that context) over a streaming
   read of 1 GiB on all threads measured beside each run (bench/bandwidth.py; the matvec figure beside);
3. chat, 16 requests in flight, tokens/s (bench.decode's workload); peak KV and how many of the
   workload's sequences fit in a 256 MiB pool (self K/V + the image K/V of one image);
4. batch captioning images/s on coca_ViT-B-32 (random weights, 32 tokens, vision tower included);
5. quality: against fp32, the greedy top-1 agreement and mean KL(fp32 || scheme) over >= 1000 teacher-
   forced positions on the random 126M Mllama and coca_ViT-B-32, and on the demo model (whatever
   checkpoint is at models/demo) the caption and per-question-family accuracy retained (the worst
   family's accuracy over fp32's). The pruned demo rows are after recovery (demo/recover.py), built
   once per demo checkpoint and cached.

int8 KV cache rows need the `kv_cache_dtype` setting (another branch); until it is merged they are
reported as not measured, and `int8_kv_quality_retained` is null. The PNG plot (bench/plots/quant.png)
needs matplotlib, which the shared venv lacks: `pip install --target .mpl matplotlib` and it is drawn
(else a message says so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import bandwidth
from bench.decode import EOS, EOT, MiB, SOT, _kv_peak_mib, _ours_caption, _ours_serve, chat_workload, load_mllama
from bench.models import BOS, random_coca_b32, random_pictures
from bench.report import BENCH_DIR, command_line, publish, table
from llm.engine import Engine, EngineConfig, ImageInput
from llm.generate import teacher_forced_logits
from llm.packed_linear import dense_copy, pack_linears
from llm.params import SamplingParams
from llm.quant import CalibrationBatch, QuantScheme, quantize_model, quantized_bytes
from llm.quant.prune import PruneSpec, importance, prune

POOL_BYTES = 256 * MiB


@dataclass(frozen=True)
class Variant:
    name: str
    weights: QuantScheme | None = None
    prune: PruneSpec | None = None
    bf16: bool = False  # unquantized weights in bf16 (quantized ones always run bf16)

    def build(self, base: torch.nn.Module, scores: dict | None) -> torch.nn.Module:
        model = dense_copy(base)
        if self.prune is not None:
            model = prune(model, self.prune, scores)
        if self.weights is not None:
            return quantize_model(model, self.weights)
        return model.to(torch.bfloat16) if self.bf16 else model


def variants(demo: bool = False) -> list[Variant]:
    """(demo: its pruned 25% attention is 96 wide, so the combination takes g32)"""
    best = QuantScheme("int4", 32 if demo else 64)
    return [Variant("fp32"), Variant("bf16", bf16=True), Variant("w8a16", QuantScheme("int8")),
            *(Variant(f"w4a16-g{g}", QuantScheme("int4", g)) for g in (32, 64, 128)),
            Variant("pruned25", prune=PruneSpec(0.25, 0.25), bf16=True),
            Variant("pruned50", prune=PruneSpec(0.5, 0.5), bf16=True),
            Variant(f"best: pruned25+w4a16-g{best.group_size}", best, PruneSpec(0.25, 0.25))]


# -- quality against fp32 -------------------------------------------------------------------------

def agreement(ref: torch.Tensor, ours: torch.Tensor) -> dict:
    """Top-1 agreement and mean KL(ref || ours) over every position of [B, T, V] logits."""
    ref, ours = ref.reshape(-1, ref.shape[-1]).float(), ours.reshape(-1, ours.shape[-1]).float()
    kl = torch.nn.functional.kl_div(ours.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"top1": float((ref.argmax(-1) == ours.argmax(-1)).float().mean()), "kl": float(kl.mean()),
            "positions": ref.shape[0]}


# -- speed ----------------------------------------------------------------------------------------

def decode_tps(decoder, prompt: list[int], image: ImageInput, new_tokens: int) -> float:
    engine = Engine(decoder, None, (EOS,), EngineConfig(max_num_seqs=1, kv_cache_bytes=64 * MiB))
    engine.add_request("one", prompt, image, SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True))
    engine.step()  # prefill + the first token
    start = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    return new_tokens / (time.perf_counter() - start)


def kv_dtype(decoder) -> torch.dtype:
    return next(decoder.parameters()).dtype


def bytes_per_token(decoder, image_tokens: int, context: int) -> float:
    dtype = kv_dtype(decoder)
    return (quantized_bytes(decoder) + decoder.kv_shape.bytes_per_token(dtype) * context
            + decoder.cross_kv_shape.bytes_per_token(dtype) * image_tokens)


def sequences_in_pool(decoder, tokens_per_sequence: float, image_tokens: int) -> int:
    dtype = kv_dtype(decoder)
    per_sequence = (decoder.kv_shape.bytes_per_token(dtype) * tokens_per_sequence
                    + decoder.cross_kv_shape.bytes_per_token(dtype) * image_tokens)
    return int(POOL_BYTES // per_sequence)


def bench_mllama(quick: bool, repeats: int) -> list[dict]:
    hf, base, encoder = load_mllama()
    del hf
    image_token = base.cfg.image_token_id
    features = encoder.encode(random_pictures(1, 7))[0]
    image = ImageInput.from_features(features)
    prompt = [BOS, image_token, *range(10, 74)]
    new_tokens = 32 if quick else 96
    g = torch.Generator().manual_seed(3)
    calib_images = torch.stack([f.tokens for f in encoder.encode(random_pictures(4, 11))])
    calib_ids = torch.cat([torch.tensor([[BOS, image_token]] * 4), torch.randint(4, 32000, (4, 62), generator=g)], 1)
    scores = importance(base, [CalibrationBatch(calib_images, calib_ids)])
    eval_images = torch.stack([f.tokens for f in encoder.encode(random_pictures(4, 12))])
    eval_ids = torch.cat([torch.tensor([[BOS, image_token]] * 4), torch.randint(4, 32000, (4, 254), generator=g)], 1)
    requests = chat_workload(16 if quick else 48, base.vocab_size, image_token)
    mean_tokens = sum(len(r.prompt) + r.new_tokens for r in requests) / len(requests)
    chat_names = ("fp32", "bf16", "w8a16", "w4a16-g64") if quick else None
    reference = None
    rows = []
    for v in variants():
        decoder = v.build(base, scores)
        logits = teacher_forced_logits(decoder, eval_images, eval_ids)
        reference = logits if reference is None else reference
        quality = agreement(reference, logits)
        del logits
        pack_linears(decoder)  # what an engine does (fp32 only), before the weights are counted
        row = {"scheme": v.name, "weight MiB": quantized_bytes(decoder) / MiB, "top1": quality["top1"],
               "kl": quality["kl"], "positions": quality["positions"]}
        bpt = bytes_per_token(decoder, features.attended_tokens, len(prompt) + new_tokens // 2)
        runs = []
        for _ in range(repeats):
            before = bandwidth.streaming_read()
            tps = decode_tps(decoder, prompt, image, new_tokens)
            ceiling = max(before, bandwidth.streaming_read())
            runs.append((tps, ceiling))
        tps, ceiling = max(runs)
        row |= {"decode tok/s": tps, "bound tok/s": ceiling / bpt, "fraction": tps * bpt / ceiling,
                "read GB/s": ceiling / 1e9}
        if chat_names is None or v.name in chat_names:
            best = 0.0
            for _ in range(max(1, repeats - 1)):
                seconds, engine, peak = _ours_serve(decoder, encoder, requests, in_flight=16)
                best = max(best, sum(r.new_tokens for r in requests) / seconds)
            row |= {"chat tok/s": best, "KV peak MiB": _kv_peak_mib(engine, peak)}
        row["seqs in 256 MiB"] = sequences_in_pool(decoder, mean_tokens, features.attended_tokens)
        rows.append(row)
        print(f"mllama {v.name}: {json.dumps({k: round(x, 4) if isinstance(x, float) else x for k, x in row.items()})}",
              flush=True)
    rows[0]["matvec GB/s"] = bandwidth.matvec() / 1e9
    return rows


def bench_coca_b32(quick: bool, repeats: int) -> list[dict]:
    from llm.models.coca import decoder_from_open_clip

    model, cfg = random_coca_b32()
    base = decoder_from_open_clip(cfg, model.state_dict())
    tower = model.visual.eval()
    pack_linears(tower)
    torch.manual_seed(1)
    pixels = torch.randn(8 if quick else 32, 3, 224, 224)
    g = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        eval_images = tower(torch.randn(16, 3, 224, 224, generator=g))[1]
    eval_ids = torch.cat([torch.full((16, 1), SOT), torch.randint(0, EOT, (16, 63), generator=g)], 1)
    names = ("fp32", "bf16", "w8a16", "w4a16-g64") if quick else ("fp32", "bf16", "w8a16", "w4a16-g32",
                                                                  "w4a16-g64", "w4a16-g128")
    reference, rows = None, []
    for v in [v for v in variants() if v.name in names]:
        decoder = v.build(base, None)
        logits = teacher_forced_logits(decoder, eval_images, eval_ids)
        reference = logits if reference is None else reference
        quality = agreement(reference, logits)
        best = 0.0
        for _ in range(repeats):
            seconds, _, engine, peak = _ours_caption(tower, decoder, pixels, 32)
            best = max(best, pixels.shape[0] / seconds)
        rows.append({"scheme": v.name, "images/s": best, "top1": quality["top1"], "kl": quality["kl"],
                     "positions": quality["positions"], "KV peak MiB": _kv_peak_mib(engine, peak)})
        print(f"coca_ViT-B-32 {v.name}: {rows[-1]}", flush=True)
    return rows


# -- the demo task ----------------------------------------------------------------------------------

def recovered_demo(spec: PruneSpec, minutes: float) -> Path:
    """The demo model pruned by `spec` and recovered: cached per demo checkpoint (its weights' digest)."""
    from app.models.compress import Compression, compress_checkpoint
    from app.settings import BUNDLED_MODEL
    from demo import world
    from demo.recover import recover
    from app.models.families.coca import CoCaModel
    from llm.loading.decoder_checkpoint import read_record, save_decoder

    digest = hashlib.sha256((BUNDLED_MODEL / "model.safetensors").read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmserve" / "bench-quant" / digest
    out = cache / spec.name
    if (out / "config.json").is_file():
        return out
    print(f"building {out} (prune, then {minutes} min of recovery; cached for later runs)", flush=True)
    cal = cache / "calibration"
    cal.mkdir(parents=True, exist_ok=True)
    rng, questions = random.Random(7), {}
    for i in range(48):
        scene = world.sample_scene(rng)
        world.render(scene).save(cal / f"{i}.png")
        for q, _ in world.questions(scene):
            questions.setdefault(world.question_kind(q), set()).add(q)
    (cal / "prompts.txt").write_text("\n".join(q for qs in questions.values() for q in sorted(qs)[:2]) + "\n")
    tmp = cache / f"{spec.name}.tmp"
    compress_checkpoint(BUNDLED_MODEL, tmp, Compression(None, spec), cal)
    model, teacher = CoCaModel.from_dir(tmp), CoCaModel.from_dir(BUNDLED_MODEL).decoder
    recover(model.decoder, teacher, model, minutes)
    save_decoder(model.decoder, tmp, read_record(json.loads((tmp / "config.json").read_text()), ""))
    tmp.rename(out)
    return out


def bench_demo(quick: bool) -> list[dict]:
    from app.models.families.coca import CoCaModel
    from app.settings import BUNDLED_MODEL
    from bench.demo_accuracy import EvalSet, accuracy, retained

    model = CoCaModel.from_dir(BUNDLED_MODEL)
    evalset = EvalSet(model, 60 if quick else 200)
    rows, reference = [], None
    skip = ("w4a16-g64", "pruned50") if quick else ()
    for v in [v for v in variants(demo=True) if v.name not in skip]:
        base = CoCaModel.from_dir(recovered_demo(v.prune, 4.0)).decoder if v.prune else model.decoder
        decoder = Variant(v.name, v.weights, None, v.bf16).build(base, None)  # pruned already, and recovered
        scores = accuracy(model, decoder, evalset)
        reference = reference or scores
        rows.append({"scheme": v.name, "images": len(evalset.features), "retained": retained(scores, reference),
                     **{k: round(x, 3) for k, x in scores.items()}})
        print(f"demo {v.name}: {rows[-1]}", flush=True)
    return rows


# -- the plot -------------------------------------------------------------------------------------

def plot(mllama: list[dict], demo: list[dict], path: Path) -> str:
    local = BENCH_DIR.parent / ".mpl"
    if local.is_dir() and str(local) not in sys.path:
        sys.path.append(str(local))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("no plot: matplotlib is not installed here (`python -m pip install --target .mpl matplotlib` "
                "in the repository root, then rerun)")
    quality = {r["scheme"]: r["retained"] for r in demo}
    fp32 = mllama[0]["decode tok/s"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in mllama:
        x, y = r["decode tok/s"] / fp32, 100 * quality.get(r["scheme"], float("nan"))
        ax.scatter(x, y)
        ax.annotate(r["scheme"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("single-stream decode speed-up vs fp32 (126M Mllama)")
    ax.set_ylabel("demo task accuracy retained vs fp32 (%, worst family)")
    ax.set_title("Speed vs quality per scheme (python -m bench.quant)")
    ax.grid(alpha=0.3)
    path.parent.mkdir(exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"![speed vs quality](plots/{path.name})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, images and repeats (< 6 minutes here)")
    parser.add_argument("--parts", default="demo,mllama,coca",
                        help="which sections to run (comma-separated: demo, mllama, coca); the summary's keys "
                             "of a section not run are null")
    args = parser.parse_args()
    q, parts = args.quick, set(args.parts.split(","))
    unknown = parts - {"demo", "mllama", "coca"}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; known: demo, mllama, coca")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    demo = bench_demo(q) if "demo" in parts else []
    print(f"demo done in {time.perf_counter() - t0:.0f} s", flush=True)
    mllama = bench_mllama(q, repeats=2 if q else 3) if "mllama" in parts else []
    print(f"mllama done in {time.perf_counter() - t0:.0f} s", flush=True)
    coca = bench_coca_b32(q, repeats=1 if q else 2) if "coca" in parts else []
    by = {r["scheme"]: r for r in mllama}
    demo_by = {r["scheme"]: r for r in demo}
    sections, summary = [], {}
    if mllama:
        fp32 = by["fp32"]
        w4 = max((r for r in mllama if r["scheme"].startswith("w4a16")), key=lambda r: r["decode tok/s"])
        columns = ["scheme", "weight MiB", "decode tok/s", "bound tok/s", "fraction", "chat tok/s", "KV peak MiB",
                   "seqs in 256 MiB", "top1", "kl"]
        sections.append((
            "126M Mllama: weights, single-stream decode (eager) vs its bandwidth bound, chat at 16 in flight, "
            "agreement with fp32", table(mllama, columns)
            + f"\n\nStreaming-read ceiling {fp32['read GB/s']:.1f} GB/s (matvec reads {fp32['matvec GB/s']:.1f}); "
              f"each run paired with the read measured beside it. top1/kl: greedy agreement and mean KL(fp32 || "
              f"scheme) over {fp32['positions']} teacher-forced positions. Pruned rows are bf16 with random-weight "
              f"importance (no recovery): their agreement says nothing of a trained model's."))
        summary |= {"w4a16_decode_speedup": round(w4["decode tok/s"] / fp32["decode tok/s"], 2),
                    "w4a16_scheme": w4["scheme"],
                    "w8a16_decode_speedup": round(by["w8a16"]["decode tok/s"] / fp32["decode tok/s"], 2),
                    "bf16_chat_speedup": round(by["bf16"]["chat tok/s"] / fp32["chat tok/s"], 2),
                    "w8a16_top1_mllama": round(by["w8a16"]["top1"], 4)}
    else:
        summary |= {"w4a16_decode_speedup": None, "w8a16_decode_speedup": None, "bf16_chat_speedup": None}
    if coca:
        sections.append(("coca_ViT-B-32: batch captioning and agreement with fp32", table(coca)))
        summary["w8a16_top1_coca_b32"] = round(next(r["top1"] for r in coca if r["scheme"] == "w8a16"), 4)
    if demo:
        sections.append((
            f"Demo task (models/demo, {demo[0]['images']} images of tests/independent_world.py): accuracy per "
            f"family and retained vs fp32 (the worst family's ratio)", table(demo)
            + "\n\nPruned rows: pruned on 48 demo-world calibration images x 10 prompts, then demo/recover.py "
              "(cached per demo checkpoint; the recovery record in its config.json says how many steps ran)."))
        summary |= {
            "bf16_quality_retained": round(demo_by["bf16"]["retained"], 4),
            "w8a16_quality_retained": round(demo_by["w8a16"]["retained"], 4),
            "w4a16_quality_retained": round(min(r["retained"] for r in demo if r["scheme"].startswith("w4a16")), 4),
            "pruned25_quality_retained": round(demo_by["pruned25"]["retained"], 4)}
    else:
        summary |= {"w8a16_quality_retained": None, "w4a16_quality_retained": None}
    if mllama and demo:
        sections.append(("Plot", plot(mllama, demo, BENCH_DIR / "plots" / "quant.png")))
    summary |= {"int8_kv_quality_retained": None,  # needs kv_cache_dtype (branch bf16kv, not merged here yet)
                "parts": sorted(parts), "threads": torch.get_num_threads(), "quick": q,
                "seconds": round(time.perf_counter() - t0, 1)}
    publish("quant", command_line(), summary, sections, details={"mllama": mllama, "coca_b32": coca, "demo": demo})


if __name__ == "__main__":
    main()
