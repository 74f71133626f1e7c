"""Readiness and the SIGTERM drain.

`/health` says the process is alive; `/ready` says it should get traffic: the model is loaded and one
tiny warm-up inference went through (the first real request does not pay for lazy initialisation),
and the server is not draining.

SIGTERM (as TGI does it): readiness turns 503 at once, so load balancers stop sending; the server keeps
serving while requests are in flight, up to `drain_timeout_s`; then uvicorn's graceful shutdown stops
listening, lets what is left finish, runs the lifespan's shutdown (the engine stops), and the process
exits with status 0. A second signal skips the wait (uvicorn's own handling: SIGINT twice forces).
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from litestar import Litestar
from PIL import Image

from app.chat.schemas import ChatCompletionRequest, ChatMessage, ImagePart, ImageURL
from app.request_id import RequestIdFilter
from app.settings import Settings

log = logging.getLogger("mmserve")


class Readiness:
    def __init__(self) -> None:
        self.warmed = False
        self.draining = False
        self.failure: str | None = None

    @property
    def ready(self) -> bool:
        return self.warmed and not self.draining

    @property
    def status(self) -> str:
        if self.draining:
            return "draining"
        if self.failure:
            return "failed"
        return "ready" if self.warmed else "warming_up"

    def start_draining(self) -> None:
        self.draining = True  # a plain store: safe from a signal handler


def _tiny_image_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def warm_up(readiness: Readiness, chat, embeddings) -> None:
    """One token of every served model (each version) through the whole chat path (image intake, vision tower,
    engine) and one text embedding of each model with contrastive towers; readiness turns green only
    if all went through."""
    try:
        for model in chat.registry.versions():  # each version by NAME@VERSION: canaries too, no split
            parts = [ImagePart(ImageURL(_tiny_image_url()))] if model.capabilities.max_images else "hello"
            await chat.complete(ChatCompletionRequest(messages=[ChatMessage("user", parts)],
                                                      model=f"{model.name}@{model.version}", max_tokens=1))
        await embeddings.warm_up()
    except Exception as e:  # noqa: BLE001 - reported by /ready; the process stays up for /health and logs
        log.exception("warm-up failed")
        readiness.failure = f"warm-up failed: {e}"
        return
    readiness.warmed = True


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its graceful shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, readiness: Readiness, in_flight: Callable[[], int],
                 drain_timeout_s: float) -> None:
        super().__init__(config)
        self.readiness, self.in_flight, self.drain_timeout_s = readiness, in_flight, drain_timeout_s
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.readiness.draining or self.should_exit:
            super().handle_exit(sig, frame)
            return
        # Runs in the signal handler: only flip a flag; `on_tick` (every 0.1 s) does the rest.
        self.readiness.start_draining()

    async def on_tick(self, counter: int) -> bool:
        if self.readiness.draining and not self.should_exit:
            now = time.monotonic()
            if self._drain_started is None:
                self._drain_started = now
                log.warning("draining: %d requests in flight", self.in_flight())
            waited = now - self._drain_started
            if self.in_flight() == 0 or waited >= self.drain_timeout_s:
                # What is still running after the drain gets the rest of the budget, at least a second.
                self.config.timeout_graceful_shutdown = max(1.0, self.drain_timeout_s - waited)
                self.should_exit = True
        return await super().on_tick(counter)


def configure_logging() -> None:
    """mmserve's log lines name the request they were written for (app/request_id.py)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)  # the end user a request names is an INFO line (app/auth.py)
    log.propagate = False


def serve(app: Litestar, settings: Settings) -> None:
    """Run `app` (made by create_app) until SIGTERM or SIGINT, then drain and exit."""
    configure_logging()
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=max(1.0, settings.drain_timeout_s))
    DrainingServer(config, app.state.readiness, lambda: app.state.metrics.in_flight_now,
                   settings.drain_timeout_s).run()
