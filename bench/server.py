"""`python -m bench.server [--quick]`: what the HTTP service adds on top of the engine.

The same chat request (the bundled demo model, one image, a one-word answer) two ways:
- end to end: `POST /v1/chat/completions` to a real `mmserve serve` process on loopback (JSON parse,
  middleware, validation, the vision stage's hot cache, the router, the engine thread, the response);
- direct: in this process, the same model's vision stage (hot cache) and engine, called in Python.
The server's own overhead is the difference of the medians (target: <= 5 ms p50).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.report import command_line, publish, table

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request_body() -> dict:
    png = (REPO / "demo" / "samples" / "sample.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {"model": "mmserve-demo", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "how many objects are there?"}]}]}


@contextmanager
def serving() -> Iterator[str]:
    """A real `mmserve serve` process on loopback (the router off: both paths then do the same work)."""
    port = _free_port()
    env = {**os.environ, "MMSERVE_PORT": str(port), "MMSERVE_THREADS": "1", "MMSERVE_ROUTER_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextmanager
def direct_chat() -> Iterator[Callable[[], None]]:
    """The same model in this process, through the same chat service (router, vision stage with its hot
    cache, the engine thread), with no HTTP."""
    import msgspec
    import torch

    from app.chat.schemas import ChatCompletionRequest
    from app.chat.service import ChatService
    from app.models.entry import ModelEntry
    from app.models.families.coca import CoCaModel
    from app.server import build_registry, build_router
    from app.settings import Settings

    torch.set_num_threads(1)
    settings = Settings()
    registry = build_registry(settings, [(ModelEntry("", settings.model), CoCaModel.from_dir(settings.model))])
    chat = ChatService(registry, build_router(settings, registry), settings)
    for served in registry:
        served.start()
    request = msgspec.convert(_request_body(), ChatCompletionRequest)
    loop = asyncio.new_event_loop()
    try:
        yield lambda: loop.run_until_complete(chat.complete(request))
    finally:
        loop.close()
        for served in registry:
            served.stop()


def measure(n: int) -> tuple[list[float], list[float]]:
    """Alternate one HTTP request and one direct call, so that both see the same machine load."""
    http, direct = [], []
    body = _request_body()
    with serving() as base, direct_chat() as call, httpx.Client(timeout=30) as client:
        for i in range(n + 5):
            start = time.perf_counter()
            client.post(f"{base}/v1/chat/completions", json=body).raise_for_status()
            middle = time.perf_counter()
            call()
            end = time.perf_counter()
            if i >= 5:  # warm-up: the first requests fill the feature cache and the prefix cache
                http.append(middle - start)
                direct.append(end - middle)
    return http, direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 30 if args.quick else 200
    http, engine = measure(n)
    p50_http, p50_direct = statistics.median(http), statistics.median(engine)
    overhead_ms = (p50_http - p50_direct) * 1e3
    rows = [{"path": "HTTP end to end", "p50 ms": p50_http * 1e3,
             "p90 ms": sorted(http)[int(0.9 * len(http))] * 1e3},
            {"path": "direct engine call", "p50 ms": p50_direct * 1e3,
             "p90 ms": sorted(engine)[int(0.9 * len(engine))] * 1e3},
            {"path": "server overhead (p50 difference)", "p50 ms": overhead_ms}]
    summary = {"server_overhead_ms_p50": round(overhead_ms, 2), "http_p50_ms": round(p50_http * 1e3, 2),
               "direct_p50_ms": round(p50_direct * 1e3, 2), "requests": n, "quick": args.quick}
    publish("server", command_line(), summary,
            [(f"Chat request, {n} of each, alternating, after 5 warm-up", table(rows))])


if __name__ == "__main__":
    main()
