"""`python -m bench.scale [--quick]`: mmserve on Ray Serve with 1, 2 and 4 replicas on this machine (requests/s
and latency percentiles of demo-model captions over HTTP, `concurrency` clients), and Ray Data captioning
against the local folder job (`mmserve caption DIR --out`) on the same images.

Needs `pip install -e '.[ray]'`. Peers in their fastest config: one replica gets all the cores' threads,
N replicas share them (threads = cores // N, at least 1); the local folder job runs with all threads, the
Ray Data job with one actor per core at one thread each. The replica-count figures are ratios against the
1-replica run of the same invocation. A 2-core machine cannot scale replicas linearly: the point of the
table is what one replica costs and what replicas buy when cores are the limit (nothing, or less).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.report import publish, table
from demo import world
from tests.conftest import data_url

CORES = os.cpu_count() or 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_body(seed: int) -> dict:
    image = world.render(world.sample_scene(random.Random(seed)))
    return {"model": "mmserve-demo", "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": "describe the image."}]}]}


def load(base: str, requests: int, concurrency: int) -> dict:
    bodies = [request_body(1000 + i) for i in range(requests)]  # distinct images: no feature-cache hits
    latencies, failures = [], 0

    def one(body: dict) -> None:
        nonlocal failures
        started = time.perf_counter()
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
        latencies.append(time.perf_counter() - started)
        failures += answer.status_code != 200

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    latencies.sort()
    return {"requests_per_s": requests / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))], "failures": failures}


def bench_replicas(counts: list[int], requests: int, concurrency: int, data: Path) -> list[dict]:
    from ray import serve

    from app.scale.ray_serve import Topology, application
    from app.settings import Settings

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base, rows = f"http://127.0.0.1:{port}", []
    for n in counts:
        settings = Settings(data_dir=data, threads=max(1, CORES // n), ray_replica_cpus=CORES / n,
                            max_concurrent_requests=64)
        started = time.perf_counter()
        serve.run(application(settings, Topology(replicas=n)), name="mmserve", route_prefix="/")
        ready_s = time.perf_counter() - started
        load(base, 2 * n, n)  # warm every replica
        row = {"replicas": n, "threads_each": settings.threads, "start_s": ready_s,
               **load(base, requests, concurrency)}
        rows.append(row)
        serve.delete("mmserve")
        print(row, flush=True)
    for row in rows:
        row["vs_1_replica"] = row["requests_per_s"] / rows[0]["requests_per_s"]
    return rows


def bench_captioning(images: int, data: Path) -> list[dict]:
    from app.caption_dir import caption_folder
    from app.cli import _load_one
    from app.scale.ray_caption import caption_on_ray
    from app.settings import Settings

    folder = data / "images"
    folder.mkdir()
    for i in range(images):
        world.render(world.sample_scene(random.Random(i))).save(folder / f"scene-{i:04d}.png")
    import torch

    torch.set_num_threads(CORES)
    local_settings = Settings(threads=CORES)
    started = time.perf_counter()
    caption_folder(folder, data / "local.jsonl", lambda: _load_one(local_settings), local_settings.intake_limits,
                   batch_size=16, progress=False)
    local_s = time.perf_counter() - started
    ray_settings = Settings(threads=1, ray_replica_cpus=1.0)
    started = time.perf_counter()
    caption_on_ray(folder, data / "ray.jsonl", ray_settings, actors=CORES, batch_size=16, progress=False)
    ray_s = time.perf_counter() - started
    same = (data / "local.jsonl").read_text() == (data / "ray.jsonl").read_text()
    return [{"way": f"local folder job ({CORES} threads)", "images": images, "seconds": local_s,
             "images_per_s": images / local_s, "same_lines": True},
            {"way": f"Ray Data ({CORES} actors x 1 thread)", "images": images, "seconds": ray_s,
             "images_per_s": images / ray_s, "same_lines": same}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and images (some minutes here)")
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=int, default=None)
    args = parser.parse_args()
    requests = args.requests or (24 if args.quick else 96)
    images = args.images or (40 if args.quick else 200)
    import ray

    from app.scale.local_ray import start_ray

    start_ray(num_cpus=CORES)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            replicas = bench_replicas([int(n) for n in args.replicas.split(",")], requests, args.concurrency,
                                      Path(tmp))
            from ray import serve

            serve.shutdown()
            captioning = bench_captioning(images, Path(tmp))
    finally:
        ray.shutdown()
    best = max(replicas, key=lambda r: r["requests_per_s"])
    summary = {"replicas": {str(r["replicas"]): {"requests_per_s": round(r["requests_per_s"], 3),
                                                 "p95_ms": round(r["p95_ms"], 1)} for r in replicas},
               "best_replicas": best["replicas"], "per_replica_requests_per_s_1": round(replicas[0]["requests_per_s"], 3),
               "captioning_images_per_s": {"local": round(captioning[0]["images_per_s"], 3),
                                           "ray_data": round(captioning[1]["images_per_s"], 3)},
               "ray_data_same_lines": captioning[1]["same_lines"], "requests": requests, "images": images,
               "concurrency": args.concurrency, "cores": CORES, "quick": args.quick}
    command = " ".join(["python -m bench.scale", *sys.argv[1:]])
    publish("scale", command, summary, [
        (f"Ray Serve replicas ({requests} demo captions over HTTP, {args.concurrency} clients, {CORES} cores)",
         table(replicas, ["replicas", "threads_each", "start_s", "requests_per_s", "vs_1_replica", "p50_ms",
                          "p95_ms", "failures"])),
        (f"Captioning {images} images: Ray Data vs the local folder job",
         table(captioning, ["way", "images", "seconds", "images_per_s", "same_lines"]) +
         "\n\nRay Data's seconds include starting its actors (each loads the model); Ray itself was already up."),
    ], details={"replicas": replicas, "captioning": captioning})


if __name__ == "__main__":
    main()
