"""Image-to-text captioning, mmserve vs transformers `generate`, per family at its published base
shapes with random weights: BLIP base, ViT-GPT2 base, TrOCR base, Florence-2 base.

    python -m bench.captioning            # 64 images x 32 new tokens per family
    python -m bench.captioning --quick    # 8 images per family

Per family and dtype (float32 by default: the fastest here for both sides; --dtypes):
- transformers: the checkpoint's image processor, then `generate(do_sample=False, min_new_tokens=N,
  max_new_tokens=N)` in batches of 16, decoded; its vision share is the encoder's forward time inside
  generate (timed by forward hooks), the rest is decode.
- mmserve end to end: `mmserve serve --model NAME=DIR` on loopback, every image sent at once as a chat
  completion (data URL, min_tokens = max_tokens = N); images/s from the first request to the last answer.
  Its decode part: the same requests again, every image's features now in the feature cache, so no
  vision tower runs (the image K/V pool too: what a repeated image costs; for Florence-2 its BART
  encoder's output, pooled per image and prompt, too); the vision part is the rest.
Florence-2 is asked for <CAPTION>, N new tokens after its forced <s> (transformers: N + 2 with its
forced <s> and </s>), with no minimum length: the others generate exactly N.
Outputs: the captions of both sides are compared (identical share); in fp32 they must all be equal.
Targets: >= 2x images/s end to end; where the vision tower dominates (the same transformers tower on
both sides), the decode part alone >= 3x.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from bench.caption_checkpoints import write_base, write_blip, write_ved
from bench.report import command_line, publish, table
from bench.serve import mmserve_launch
from bench.server_process import free_port, serving

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
FAMILIES = ("blip", "vit-gpt2", "trocr", "florence2")
BATCH = 16
TINY_VED = {"vit-gpt2": ("vit", "gpt2"), "trocr": ("vit", "trocr")}
FLORENCE_TASK = "<CAPTION>"  # what mmserve asks Florence-2 for when a request has no text


def checkpoint(family: str, tiny: bool = False) -> Path:
    """The family's checkpoint at its published base shape (or the tests' tiny one), built once."""
    path = OUT / f"caption-{family}-{'tiny' if tiny else 'base'}"
    if not (path / "config.json").is_file():
        if family == "florence2":
            from bench.florence2_checkpoint import PRESETS, write_florence2_checkpoint

            write_florence2_checkpoint(path, **PRESETS["tiny" if tiny else "base"])
        elif tiny:
            write_blip(path) if family == "blip" else write_ved(path, *TINY_VED[family])
        else:
            write_base(path, family)
    return path


def pictures(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(360 + 8 * (i % 5), 480, 3, generator=g) * 255).byte().numpy())
            for i in range(n)]


def png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# -- transformers ------------------------------------------------------------------------------------
class Peer:
    """transformers' own way to caption with a checkpoint of one family: model, inputs, the tower."""

    def __init__(self, family: str, path: Path, dtype: torch.dtype) -> None:
        import transformers as tf

        self.family, self.dtype = family, dtype
        cls = {"blip": tf.BlipForConditionalGeneration, "florence2": tf.Florence2ForConditionalGeneration}.get(
            family, tf.VisionEncoderDecoderModel)
        self.model = cls.from_pretrained(path, dtype=dtype).eval()
        if family == "florence2":
            self.processor = tf.AutoProcessor.from_pretrained(path)
            self.tower = self.model.model.vision_tower
        else:
            self.processor = tf.AutoImageProcessor.from_pretrained(path)
            self.tokenizer = tf.AutoTokenizer.from_pretrained(path)
            self.tower = self.model.vision_model if family == "blip" else self.model.encoder

    def generate(self, images: list[Image.Image], new: int) -> list[str]:
        images = [im.convert("RGB") for im in images]
        if self.family == "florence2":  # its forced <s> first and </s> last are not part of mmserve's count
            inputs = self.processor(text=[FLORENCE_TASK] * len(images), images=images, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=new + 2)
            return self.processor.batch_decode(out, skip_special_tokens=True)
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.dtype)
        out = self.model.generate(pixel_values=pixels, do_sample=False, max_new_tokens=new, min_new_tokens=new)
        # the new tokens: after the start token ([DEC] for BLIP, decoder_start_token_id for VED)
        return self.tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)


def run_transformers(family: str, path: Path, images: list[Image.Image], new: int, dtype: torch.dtype) -> dict:
    peer = Peer(family, path, dtype)
    spent = {"vision": 0.0}
    peer.tower.register_forward_pre_hook(lambda *_: spent.__setitem__("t0", time.perf_counter()))
    peer.tower.register_forward_hook(lambda *_: spent.__setitem__("vision", spent["vision"] + time.perf_counter()
                                                                  - spent["t0"]))
    with torch.inference_mode():
        peer.generate(images[:2], 2)  # warm-up, not timed
        spent["vision"] = 0.0
        captions = []
        start = time.perf_counter()
        for i in range(0, len(images), BATCH):
            captions += peer.generate(images[i:i + BATCH], new)
        total = time.perf_counter() - start
    return {"seconds": total, "vision_s": spent["vision"], "decode_s": total - spent["vision"], "captions": captions}


# -- mmserve -----------------------------------------------------------------------------------------
async def _ask_all(base_url: str, model: str, urls: list[str], new: int, exact: bool = True) -> list[str]:
    async with httpx.AsyncClient(base_url=base_url, timeout=3600) as client:
        async def one(url: str) -> str:
            body = {"model": model, "max_completion_tokens": new, "temperature": 0, **({"min_tokens": new} if exact else {}),
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]
        return list(await asyncio.gather(*(one(u) for u in urls)))


def run_mmserve_http(family: str, path: Path, images: list[Image.Image], new: int, dtype: str, threads: int) -> dict:
    """Every image at once, twice: the first pass end to end (decode, vision tower and all); the second
    finds every image's features in the feature cache, so it is the serving path without the vision
    tower: its time is mmserve's decode part (prefill and steps, over HTTP)."""
    urls = [png_url(im) for im in images]
    warm = png_url(pictures(1, seed=99)[0])
    launch = mmserve_launch(free_port(), {"captioner": path}, dtype)
    # room for every image's K/V at once, and its features in the hot cache
    launch.env.update({"MMSERVE_CROSS_CACHE_BYTES": str(1 << 30), "MMSERVE_FEATURE_CACHE_HOT_BYTES": str(1 << 30),
                       "MMSERVE_MAX_NUM_SEQS": str(max(64, len(images))), "MMSERVE_THREADS": str(threads),
                       "MMSERVE_REQUEST_TIMEOUT_S": "7200"})
    with serving(launch, OUT / f"captioning-{path.name}-{dtype}.log") as server:
        asyncio.run(_ask_all(server.base_url, "captioner", [warm], 2))
        start = time.perf_counter()
        # Florence-2 ends where its forced </s> falls (transformers: no min_new_tokens beside it)
        exact = family != "florence2"
        captions = asyncio.run(_ask_all(server.base_url, "captioner", urls, new, exact))
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        again = asyncio.run(_ask_all(server.base_url, "captioner", urls, new, exact))
        decode = time.perf_counter() - start
        return {"seconds": seconds, "decode_s": decode, "vision_s": max(0.0, seconds - decode), "captions": captions,
                "repeat_identical": again == captions, "rss_mib": server.rss_mib()}


def same(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 images per family")
    parser.add_argument("--images", type=int, default=None, help="images per family (default 64; --quick 8)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--dtypes", default="float32",
                        help="comma-separated dtypes to run each side in (each side's figure is its fastest); "
                             "float32 is the fastest here for both (bench/RESULTS.md, the dtype probe)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, each side")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny checkpoints: checks the harness only")
    args = parser.parse_args()
    n = args.images or (8 if args.quick else 64)
    torch.set_num_threads(args.threads)
    images = pictures(n)
    began = time.perf_counter()
    rows, parts_rows = [], []
    summary = {"images": n, "new_tokens": args.new_tokens, "threads": args.threads, "quick": args.quick}
    for family in args.families.split(","):
        path = checkpoint(family, args.tiny)
        best = {"hf": [], "ours": []}
        for dtype in args.dtypes.split(","):
            hf = run_transformers(family, path, images, args.new_tokens, getattr(torch, dtype))
            ours = run_mmserve_http(family, path, images, args.new_tokens, dtype, args.threads)
            for side, r in (("transformers generate (batches of 16)", hf), ("mmserve (HTTP, all at once)", ours)):
                rows.append({"family": family, "side": side, "dtype": dtype, "images_per_s": n / r["seconds"],
                             "seconds": r["seconds"], "vision_share": r["vision_s"] / r["seconds"],
                             "decode_share": r["decode_s"] / r["seconds"]})
            parts_rows.append({"family": family, "dtype": dtype, "hf_vision_s": hf["vision_s"],
                               "hf_decode_s": hf["decode_s"], "mmserve_vision_s": ours["vision_s"],
                               "mmserve_decode_s": ours["decode_s"], "decode_speedup": hf["decode_s"] / ours["decode_s"],
                               "end_to_end_speedup": hf["seconds"] / ours["seconds"],
                               "captions_identical": same(ours["captions"], hf["captions"]),
                               "repeat_identical": ours["repeat_identical"], "mmserve_rss_mib": ours["rss_mib"]})
            best["hf"].append((n / hf["seconds"], dtype, hf["decode_s"], hf["vision_s"] / hf["seconds"]))
            best["ours"].append((n / ours["seconds"], dtype, ours["decode_s"]))
            print(f"{family} {dtype}: transformers {n / hf['seconds']:.3f} img/s, mmserve {n / ours['seconds']:.3f} "
                  f"img/s; decode {hf['decode_s']:.1f} s vs {ours['decode_s']:.1f} s; identical "
                  f"{parts_rows[-1]['captions_identical']:.2f}", flush=True)
        hf_best, ours_best = max(best["hf"]), max(best["ours"])
        s = summary[family] = {
            "hf_images_per_s": round(hf_best[0], 4), "hf_dtype": hf_best[1],
            "mmserve_images_per_s": round(ours_best[0], 4), "mmserve_dtype": ours_best[1],
            "end_to_end_speedup": round(ours_best[0] / hf_best[0], 3),
            "decode_speedup": round(hf_best[2] / ours_best[2], 3), "hf_vision_share": round(hf_best[3], 3),
            "captions_identical": min(r["captions_identical"] for r in parts_rows if r["family"] == family)}
        # >= 2x end to end; where the (shared) vision tower dominates, >= 3x on the decode part alone
        s["target_met"] = s["end_to_end_speedup"] >= 2 or (s["hf_vision_share"] >= 0.5 and s["decode_speedup"] >= 3)
    summary["seconds"] = round(time.perf_counter() - began, 1)
    publish("captioning", command_line(), summary,
            [(f"Images/s end to end ({n} images, {args.new_tokens} new tokens each, {args.threads} thread(s))",
              table(rows)),
             ("Vision and decode seconds, decode alone, captions identical to transformers'", table(parts_rows))],
            write_md=not args.tiny, details={"rows": rows, "parts": parts_rows})


if __name__ == "__main__":
    main()
