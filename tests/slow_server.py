"""A real mmserve server process on loopback whose vision tower takes `DELAY_S` longer per call, so that
overload and drain tests can hold requests in flight for a known time:

    python -m tests.slow_server PORT DELAY_S [STEP_DELAY_S]       (settings from MMSERVE_* as usual)

Everything else is the real thing: create_app, the middleware, uvicorn via app.lifecycle.serve.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

from app.models.families.coca import CoCaModel
from llm.hardware import resolve_dtype

REPO = Path(__file__).resolve().parent.parent


def slowed(model: CoCaModel, delay_s: float, step_delay_s: float) -> CoCaModel:
    """The demo model with every image encode `delay_s` slower, and every engine step (each decoder
    forward) `step_delay_s` slower, so a stream stays open long enough to leave it."""
    encode = model.encoder.encode

    def slow_encode(images):
        time.sleep(delay_s)
        return encode(images)

    model.encoder.encode = slow_encode
    if step_delay_s:
        model.decoder.register_forward_pre_hook(lambda *_: time.sleep(step_delay_s))
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_url(colour=(200, 40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@contextmanager
def running_server(delay_s: float, env: dict[str, str], ready_within_s: float = 90,
                   step_delay_s: float = 0.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the server, wait until /ready answers 200, yield (base URL, process); kill it if still up."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.slow_server", str(port), str(delay_s), str(step_delay_s)],
                            cwd=REPO,
                            env={**os.environ, "MMSERVE_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            proc.kill()
            raise RuntimeError("server did not become ready:\n" + (proc.stdout.read() if proc.stdout else ""))
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def main(argv: list[str]) -> None:
    from app.lifecycle import serve
    from app.server import create_app
    from app.settings import Settings

    port, delay_s = int(argv[0]), float(argv[1])
    settings = Settings.from_env(port=port)
    # in the settings' dtype: a model in another would be served as a converted copy, without the delays
    model = slowed(CoCaModel.from_dir(settings.model, resolve_dtype(settings.dtype)), delay_s,
                   float(argv[2]) if len(argv) > 2 else 0.0)
    serve(create_app(settings, model), settings)


if __name__ == "__main__":
    main(sys.argv[1:])
