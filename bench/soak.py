"""`python -m bench.soak [--quick] [--minutes M]`: thousands of mixed requests over minutes against a real
server process, and what a long-running server must not do: grow, leak, lose.

The mix (per worker, round robin): an image chat, the same streamed to its end, a stream abandoned after
its first chunk, a bad image (a 400 expected), a text embedding, a classification, and every so often a
small batch (file upload + batch create). Figures:
- memory: the server's RSS after warm-up and at the end (growth target < 10%);
- file descriptors: open fds after warm-up and at the end, once idle (no leak: the end within a few of it);
- KV: the engine's KV-pool usage once idle again (back to its baseline, 0);
- lost: accepted requests (2xx) whose answer did not arrive whole (no final chunk, no choices), plus batch
  lines not answered exactly once; target 0. Any 5xx is counted too (target 0).
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from bench.report import command_line, publish, table
from bench.server_process import Launch, free_port, serving
from tests import independent_world as world

MMSERVE = str(Path(sys.executable).parent / "mmserve")
KV_USAGE = re.compile(r'^mmserve_kv_cache_usage_ratio\{[^}]*\} (\S+)', re.M)
IMAGES = 16  # distinct images (some repeat: the feature cache is part of what is soaked)


def data_urls(n: int) -> list[str]:
    urls = []
    for seed in range(n):
        buf = io.BytesIO()
        world.render(world.sample_scene(np.random.default_rng(seed))).save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def chat_body(url: str, stream: bool = False) -> dict:
    return {"model": "mmserve-demo", "max_tokens": 12, "stream": stream, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "describe the image."}]}]}


class Soak:
    def __init__(self, base: str, urls: list[str]) -> None:
        self.base, self.urls = base, urls
        self.statuses: Counter[str] = Counter()
        self.lost: list[str] = []
        self.batches: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def _note(self, kind: str, status: int) -> None:
        with self.lock:
            self.statuses[f"{kind} {status}"] += 1

    def _lost(self, why: str) -> None:
        with self.lock:
            self.lost.append(why)

    def chat(self, c: httpx.Client, url: str) -> None:
        r = c.post("/v1/chat/completions", json=chat_body(url))
        self._note("chat", r.status_code)
        if r.status_code == 200 and not r.json().get("choices"):
            self._lost("chat: 200 without choices")

    def stream(self, c: httpx.Client, url: str, abandon: bool) -> None:
        with c.stream("POST", "/v1/chat/completions", json=chat_body(url, stream=True)) as r:
            self._note("abandoned stream" if abandon else "stream", r.status_code)
            done = False
            for line in r.iter_lines():
                if abandon:
                    return  # close the connection after the first line: the server must free the sequence
                done = done or line.strip() == "data: [DONE]"
            if r.status_code == 200 and not done:
                self._lost("stream: 200 without [DONE]")

    def bad_image(self, c: httpx.Client) -> None:
        body = chat_body("data:image/png;base64," + base64.b64encode(b"not a png").decode())
        r = c.post("/v1/chat/completions", json=body)
        self._note("bad image", r.status_code)

    def embed(self, c: httpx.Client, i: int) -> None:
        r = c.post("/v1/embeddings", json={"model": "mmserve-demo", "input": f"a red circle {i}"})
        self._note("embeddings", r.status_code)

    def classify(self, c: httpx.Client, url: str) -> None:
        r = c.post("/v1/classify", json={"model": "mmserve-demo", "image": url})
        self._note("classify", r.status_code)

    def batch(self, c: httpx.Client, worker: int, i: int) -> None:
        lines = [json.dumps({"custom_id": f"w{worker}-b{i}-{k}", "method": "POST", "url": "/v1/chat/completions",
                             "body": chat_body(self.urls[k % len(self.urls)])}) for k in range(4)]
        up = c.post("/v1/files", files={"file": ("in.jsonl", ("\n".join(lines) + "\n").encode())},
                    data={"purpose": "batch"})
        self._note("file upload", up.status_code)
        if up.status_code != 200:
            return
        b = c.post("/v1/batches", json={"input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions",
                                        "completion_window": "24h"})
        self._note("batch create", b.status_code)
        if b.status_code == 200:
            with self.lock:
                self.batches.append((b.json()["id"], len(lines)))

    def worker(self, worker: int, stop_at: float) -> None:
        rng = random.Random(worker)
        with httpx.Client(base_url=self.base, timeout=300) as c:
            for i in itertools.count():
                if time.monotonic() > stop_at:
                    return
                url = rng.choice(self.urls)
                step = i % 8
                if step in (0, 1):
                    self.chat(c, url)
                elif step == 2:
                    self.stream(c, url, abandon=False)
                elif step == 3:
                    self.stream(c, url, abandon=True)
                elif step == 4:
                    self.bad_image(c)
                elif step == 5:
                    self.embed(c, i)
                elif step == 6:
                    self.classify(c, url)
                elif i % 48 == 7:
                    self.batch(c, worker, i)

    def check_batches(self, deadline_s: float) -> None:
        """Every batch completes, each line answered exactly once."""
        with httpx.Client(base_url=self.base, timeout=60) as c:
            for batch_id, n in self.batches:
                until = time.monotonic() + deadline_s
                while (b := c.get(f"/v1/batches/{batch_id}").json())["status"] not in ("completed", "failed",
                                                                                       "cancelled", "expired"):
                    if time.monotonic() > until:
                        self._lost(f"batch {batch_id}: still {b['status']} after {deadline_s:.0f} s")
                        break
                    time.sleep(1)
                else:
                    ids = [json.loads(line)["custom_id"] for line in
                           c.get(f"/v1/files/{b['output_file_id']}/content").text.splitlines()] \
                        if b.get("output_file_id") else []
                    if sorted(ids) != sorted(set(ids)) or len(ids) != n:
                        self._lost(f"batch {batch_id}: {len(ids)} answers ({len(set(ids))} distinct) for {n} lines")


def proc_figures(pid: int) -> tuple[float, int]:
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return rss / 1024, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def idle_kv(base: str, wait_s: float = 30) -> float:
    """The KV-pool usage once the engine has nothing to do (polled until 0 or wait_s)."""
    until = time.monotonic() + wait_s
    while True:
        usage = sum(float(v) for v in KV_USAGE.findall(httpx.get(base + "/metrics", timeout=30).text))
        if usage == 0 or time.monotonic() > until:
            return usage
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 minutes of load")
    parser.add_argument("--minutes", type=float, default=0, help="minutes of load (default 8, quick 2)")
    parser.add_argument("--workers", type=int, default=6)
    args = parser.parse_args()
    minutes = args.minutes or (2 if args.quick else 8)
    urls = data_urls(IMAGES)
    with tempfile.TemporaryDirectory() as tmp:
        launch = Launch("mmserve", [MMSERVE, "serve", "--port", str(free_port())],
                        {"MMSERVE_THREADS": "2", "MMSERVE_DATA_DIR": tmp}, "mmserve-demo", "/health")
        with serving(launch, Path(tmp) / "server.log", start_timeout_s=300) as served:
            soak = Soak(served.base_url, urls)
            soak.worker(99, time.monotonic() + 20)  # warm-up: every kind once, caches and pools grown
            idle_kv(served.base_url)
            rss0, fds0 = proc_figures(served.process.pid)
            soak.statuses.clear()
            start = time.monotonic()
            threads = [threading.Thread(target=soak.worker, args=(w, start + minutes * 60)) for w in range(args.workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.monotonic() - start
            soak.check_batches(deadline_s=300)
            kv = idle_kv(served.base_url)
            rss1, fds1 = proc_figures(served.process.pid)
    requests = sum(soak.statuses.values())
    fives = sum(n for k, n in soak.statuses.items() if k.split()[-1].startswith("5"))
    summary = {"requests": requests, "seconds": round(seconds), "requests_per_s": round(requests / seconds, 1),
               "rss_growth": round(rss1 / rss0 - 1, 4), "fds_start": fds0, "fds_end": fds1, "kv_usage_idle": kv,
               "lost": len(soak.lost), "server_5xx": fives, "batches": len(soak.batches)}
    rows = [{"figure": k, "value": v} for k, v in summary.items()] + [
        {"figure": "RSS MiB after warm-up / end", "value": f"{rss0:.0f} / {rss1:.0f}"}]
    mix = [{"request, status": k, "count": n} for k, n in sorted(soak.statuses.items())]
    publish("soak", command_line(), summary, [("Soak", table(rows)), ("Mix", table(mix))],
            details={"lost": soak.lost[:50]})


if __name__ == "__main__":
    main()
