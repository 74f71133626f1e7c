"""mmserve on Ray Serve: the same litestar app as N replicas, each owning its engines, behind one gateway.

    client -> Serve's HTTP proxy -> Gateway (thin: forwards, merges /metrics) -> Replica x N (create_app)

Each `Replica` builds the app from the settings and runs its lifespan (engines, batch worker) in its own
actor process. What replicas must agree on lives in the data directory, which the replicas of a host
share: batches (SQLite, each batch leased to one replica at a time: app/batches/store.py), keys, quotas
and the audit log (app/tenancy/, SQLite and a locked file), and the disk feature cache
(`feature_cache_dir`). The gateway sends a request to a replica through a DeploymentHandle (Serve picks
the less loaded of two) and streams its answer back; if that replica dies before answering, the client
gets a 503 with Retry-After at once, never a hang (app/scale/asgi_call.py runs the app per request).

Drain: Serve stops routing to a replica it is stopping (scale-down, redeploy, `serve shutdown`) and waits
up to `graceful_shutdown_timeout_s` (= drain_timeout_s) for its requests in flight; then the replica's
lifespan ends: the batch worker gives its lease back (another replica takes the batch over at once) and
the engines stop. Autoscaling (`autoscale=(min, max)`) follows requests in flight per replica.

Ray is optional (`pip install 'mmserve[ray]'`): this module imports it at the top, so import it only
after `require_ray()` said yes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from app.scale.local_ray import start_ray
from app.scale.asgi_call import HTTPCall, Head, call
from app.scale.replica_metrics import fresh, merged, publish, withdraw
from app.settings import Settings

log = logging.getLogger("mmserve")
REPLICA_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)
GATEWAY_GRACE_S = 5.0  # past request_timeout_s, for the replica's own timeout answer to arrive first
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}


def metrics_dir(settings: Settings) -> Path:
    return settings.data_dir / "metrics" / "replicas"


class Replica:
    """One copy of the app with its own engines; the gateway calls `handle` once per HTTP request."""

    async def __init__(self, settings: Settings) -> None:
        from app.server import create_app  # here: torch and the models load in the replica, not the driver

        self.settings = settings
        self.app = create_app(settings)
        self._life = self.app.lifespan()
        await self._life.__aenter__()
        context = serve.get_replica_context()
        self.name = f"{context.deployment}-{context.replica_id.unique_id}"
        self._publisher = asyncio.create_task(self._publish_metrics())

    async def handle(self, request: HTTPCall) -> AsyncIterator[Head | bytes]:
        async for piece in call(self.app, request):
            if isinstance(piece, Head):  # which replica answered: for logs, tests and affinity checks
                piece = Head(piece.status, piece.headers + ((b"x-mmserve-replica", self.name.encode()),))
            yield piece

    async def _publish_metrics(self) -> None:
        metrics = self.app.state.metrics
        while True:
            await asyncio.to_thread(publish, metrics_dir(self.settings), self.name, metrics.render())
            await asyncio.sleep(self.settings.ray_metrics_interval_s)

    async def __del__(self) -> None:
        """Serve calls this once the replica's requests have drained: stop like a server's lifespan does."""
        self._publisher.cancel()
        withdraw(metrics_dir(self.settings), self.name)
        await self._life.__aexit__(None, None, None)


class Gateway:
    """The HTTP entry: forwards each request to a replica and answers /metrics for all of them."""

    def __init__(self, replicas: DeploymentHandle, settings: Settings) -> None:
        self.replicas = replicas.options(method_name="handle", stream=True)
        self.settings = settings

    async def __call__(self, request: Request) -> Response:
        if request.url.path == "/metrics" and request.method == "GET":
            return self._metrics(request)
        headers = tuple((k, v) for k, v in request.headers.raw if k.lower() != b"host") + (
            (b"host", request.headers.get("host", "mmserve").encode()),)
        client = (request.client.host, request.client.port) if request.client else ("127.0.0.1", 0)
        forwarded = HTTPCall(request.method, request.url.path, request.url.query.encode(), headers,
                             await request.body(), client)
        pieces = self.replicas.remote(forwarded)
        try:
            # Bounded: with every replica gone, Serve queues the request until a new one is up (minutes
            # when models load); past the app's own deadline the client is told to come back instead.
            async with asyncio.timeout(self.settings.request_timeout_s + GATEWAY_GRACE_S):
                head = await pieces.__anext__()
        except REPLICA_LOST as e:
            log.warning("a replica was lost with a request in flight: %s", e)
            return self._unavailable("the replica serving this request stopped; retry")
        except TimeoutError:
            pieces.cancel()
            return self._unavailable(f"no replica answered within {self.settings.request_timeout_s:g} s "
                                     "(setting request_timeout_s); retry")
        assert isinstance(head, Head), "a replica answers with its head first"

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in pieces:
                    yield chunk
            except REPLICA_LOST:  # mid-body: the status is out already; the stream just ends
                log.warning("a replica was lost mid-response")

        response = StreamingResponse(body(), status_code=head.status)
        response.raw_headers = [(k, v) for k, v in head.headers if k.lower() not in HOP_BY_HOP]  # the app's own
        return response

    def _unavailable(self, message: str) -> Response:
        return JSONResponse({"error": {"message": message, "type": "server_error", "param": None,
                                       "code": "replica_unavailable"}}, status_code=503,
                            headers={"Retry-After": str(self.settings.overload_retry_after_s)})

    def _metrics(self, request: Request) -> Response:
        """Every live replica's metrics, each sample labelled `replica`; `?replica=NAME` keeps one."""
        expositions = fresh(metrics_dir(self.settings), 3 * self.settings.ray_metrics_interval_s + 5)
        wanted = request.query_params.get("replica")
        if wanted is not None:
            if wanted not in expositions:
                return JSONResponse({"error": {"message": f"no live replica {wanted!r}; live: "
                                               f"{', '.join(expositions) or 'none'}", "type": "invalid_request_error",
                                               "param": "replica", "code": None}}, status_code=404)
            return Response(expositions[wanted], media_type="text/plain; version=0.0.4")
        return Response(merged(expositions), media_type="text/plain; version=0.0.4")


@dataclasses.dataclass(frozen=True, slots=True)
class Topology:
    replicas: int = 1  # a fixed count; ignored when autoscale is set
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, scaled on requests in flight
    target_ongoing_requests: float = 2.0  # per replica, what autoscaling aims at
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.autoscale is not None and not 1 <= self.autoscale[0] <= self.autoscale[1]:
            raise ValueError(f"--autoscale MIN:MAX needs 1 <= MIN <= MAX, got {self.autoscale[0]}:{self.autoscale[1]}")

    @property
    def least(self) -> int:
        return self.autoscale[0] if self.autoscale else self.replicas


def application(settings: Settings, topology: Topology) -> serve.Application:
    scaling = ({"autoscaling_config": {"min_replicas": topology.autoscale[0], "max_replicas": topology.autoscale[1],
                                       "initial_replicas": topology.autoscale[0],
                                       "target_ongoing_requests": topology.target_ongoing_requests,
                                       "upscale_delay_s": topology.upscale_delay_s,
                                       "downscale_delay_s": topology.downscale_delay_s,
                                       "metrics_interval_s": 1.0, "look_back_period_s": 2.0}}
               if topology.autoscale else {"num_replicas": topology.replicas})
    replica = serve.deployment(
        Replica, name="mmserve", ray_actor_options={"num_cpus": settings.ray_replica_cpus},
        max_ongoing_requests=settings.max_concurrent_requests + settings.max_queued_requests,
        graceful_shutdown_timeout_s=settings.drain_timeout_s, graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=5.0, **scaling)
    gateway = serve.deployment(Gateway, name="gateway", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000)
    return gateway.bind(replica.bind(settings), settings)


def check_placement(topology: Topology, replica_cpus: float) -> None:
    """Refuse at start, in one line, what the cluster cannot place (Serve would wait for ever)."""
    cpus = ray.cluster_resources().get("CPU", 0.0)
    need = topology.least * replica_cpus
    if need > cpus + 1e-9:
        raise ValueError(f"{topology.least} replica(s) x {replica_cpus:g} CPU (setting ray_replica_cpus) need "
                         f"{need:g} CPUs; the Ray cluster has {cpus:g}")


def build(args: dict) -> serve.Application:
    """`serve run deploy/ray/serve.yaml`: settings from MMSERVE_* variables, topology from the file's args."""
    settings = Settings.from_env()
    autoscale = args.get("autoscale")
    topology = Topology(replicas=int(args.get("replicas", 1)),
                        autoscale=tuple(int(x) for x in str(autoscale).split(":")) if autoscale else None)
    return application(settings, topology)


def run(settings: Settings, topology: Topology, address: str = "") -> None:
    """`mmserve serve --ray`: start (or join) a cluster, deploy, serve until SIGTERM/SIGINT, shut down."""
    start_ray(address)  # joins `address`, else a local cluster of this machine on loopback
    try:
        check_placement(topology, settings.ray_replica_cpus)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings, topology), name="mmserve", route_prefix="/")
        print(f"mmserve: serving on Ray Serve at http://{settings.host}:{settings.port} with "
              f"{f'{topology.autoscale[0]}..{topology.autoscale[1]} (autoscaled)' if topology.autoscale else topology.replicas}"
              " replica(s)", flush=True)
        _wait_for_signal()
    finally:
        serve.shutdown()  # drains the replicas (graceful_shutdown_timeout_s), then stops them
        ray.shutdown()


def _wait_for_signal() -> None:
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
