"""The vision stage: the one object the serving path calls to turn an image into visual tokens.

    source (bytes | base64 | data: URL | allow-listed http(s) URL)
      -> raw bytes (intake limits; vision/fetch.py for URLs)
      -> FeatureKey(sha256 of the raw bytes, encoder name + weights digest, preprocessing, reduction,
                    tenant salt)
      -> FeatureCache.get_or_compute(decode with limits -> micro-batched encode -> reduce)
      -> VisionResult(features with the reduced tokens, key digest, "hot" | "disk" | "computed")

The key is computed before anything is decoded, so a hot hit costs one SHA-256 of the bytes and a
copy of the tensors (cache/key.py explains why raw bytes rather than pixels). The key digest names the
visual tokens exactly, so the engine uses it as the key of the image's cross-attention K/V.

The cache stores the REDUCED tokens under a key that names the reduction: a conversation asks for the
same reduction every turn, so a hit needs no further work. (The cost: asking for one image at two
reductions encodes it twice.) A bad image raises its typed `ImageError` from inside the computation,
so nothing is ever cached for it, and concurrent requests for the same new image run the encoder once
(single-flight) while different images are batched into shared forwards (vision/batcher.py).

`visual_tokens` per request: None = the configured default, an int = that many tokens, a float in
(0, 1] = that share of the encoder's tokens; 1.0 (or a default of None) means no reduction. The method
is a configuration choice (`reduction_method`), as its quality depends on the model (bench/vision.py).

Runs in the caller's thread and blocks (fetch, decode, waiting on the encoder): async callers run it
on a worker thread. Nothing here imports app/: the app builds a `VisionStageConfig` from its settings.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from cache import FeatureCache, FeatureKey, Source, image_digest
from vision.batcher import MicroBatcher
from vision.encoders.base import ImageEncoder, ImageFeatures
from vision.fetch import FetchPolicy, RemoteFetcher
from vision.intake import ImageError, IntakeLimits, open_image, source_bytes
from vision.reduce import METHODS, ReductionSpec, reduce

VisualTokens = int | float | None


class VisualTokensError(ValueError):
    """A `visual_tokens` value the stage cannot honour; the message says what is accepted."""

    param = "visual_tokens"
    code = "invalid_visual_tokens"


def parse_visual_tokens(text: str) -> VisualTokens:
    """A setting's text: "" -> None (every token), "16" -> 16 tokens, "0.25" -> a quarter of them."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise VisualTokensError(f"visual_tokens must be a count like 16 or a ratio like 0.25, got {text!r}") from None


@dataclass(frozen=True, slots=True)
class VisionStageConfig:
    intake: IntakeLimits = field(default_factory=IntakeLimits)
    fetch: FetchPolicy = field(default_factory=FetchPolicy)  # no allowed hosts: remote URLs refused
    max_batch: int = 16  # images per encoder forward
    max_wait_ms: float = 5.0  # how long a forward waits for more images after the first
    threads: int = 0  # torch intra-op threads for the encoder's forwards; 0 = leave torch's setting
    hot_bytes: int = 256 * 1024 * 1024  # in-process feature cache
    disk_dir: str | None = None  # persistent feature cache shared by the host's workers; None = none
    disk_bytes: int = 1024 * 1024 * 1024
    default_visual_tokens: VisualTokens = None  # what a request that names no visual_tokens gets
    reduction_method: str = "tome"  # pool (grid towers only), tome or keep; see vision/reduce.py

    def __post_init__(self) -> None:
        if self.reduction_method not in METHODS or self.reduction_method == "none":
            raise ValueError(f"reduction_method must be one of pool, tome, keep; got {self.reduction_method!r}")
        if self.hot_bytes < 0 or self.disk_bytes <= 0:
            raise ValueError("feature cache sizes must be >= 0 (hot) and > 0 (disk)")
        reduction_spec(self.reduction_method, self.default_visual_tokens)  # raises on a bad default


def reduction_spec(method: str, visual_tokens: VisualTokens) -> ReductionSpec:
    """The spec for a request's `visual_tokens`, with errors a client can act on."""
    if visual_tokens is None or (isinstance(visual_tokens, float) and visual_tokens == 1.0):
        return ReductionSpec()  # every token: one key for "all", however it was asked for
    if isinstance(visual_tokens, bool) or not isinstance(visual_tokens, (int, float)):
        raise VisualTokensError(f"visual_tokens must be a count >= 1 or a ratio in (0, 1], got {visual_tokens!r}")
    try:
        return ReductionSpec(method, visual_tokens)
    except ValueError as error:
        raise VisualTokensError(f"{error}; send a count >= 1 or a ratio in (0, 1]") from None


@dataclass(frozen=True)
class VisionResult:
    features: ImageFeatures  # tokens already reduced
    key: str  # the FeatureKey digest: names these tokens exactly (the engine's cross-attention K/V key)
    source: Source  # "hot" | "disk" | "computed"
    image_digest: str = ""  # sha256 of the image's bytes: how the audit log names an image
    pixels: int = 0  # width x height, read from the header (0 when unreadable): quotas count pixels


def header_pixels(data: bytes) -> int:
    """The image's width x height from its header alone (PIL opens lazily: nothing is decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[0] * image.size[1]
    except Exception:  # noqa: BLE001 - a count for quotas and the audit, never a reason to refuse
        return 0


class VisionStage:
    def __init__(self, encoder: ImageEncoder, config: VisionStageConfig, *,
                 fetch: Callable[[str], bytes] | None = None) -> None:
        """`fetch` replaces the fetcher built from `config.fetch` (tests point it at a local server)."""
        self.encoder, self.config = encoder, config
        self._fetch = fetch if fetch is not None else RemoteFetcher(config.fetch) if config.fetch.enabled else None
        self._grid = encoder.token_grid
        if config.reduction_method == "pool" and self._grid is None:
            raise ValueError(f"reduction 'pool' needs grid tokens; {encoder.name}'s tokens have no grid: "
                             f"use 'tome' or 'keep'")
        self._query = encoder.saliency_query
        self._preprocess = encoder.preprocess_cfg.to_dict()
        self._cache = FeatureCache(config.hot_bytes, config.disk_dir, config.disk_bytes)
        self._batcher = MicroBatcher(encoder.encode, config.max_batch, config.max_wait_ms, config.threads,
                                     name=f"vision-encoder:{encoder.name}")
        self._lock = threading.Lock()
        self._requests = self._image_errors = 0

    def reduction_for(self, visual_tokens: VisualTokens) -> ReductionSpec:
        chosen = self.config.default_visual_tokens if visual_tokens is None else visual_tokens
        return reduction_spec(self.config.reduction_method, chosen)

    def key_for(self, data: bytes, spec: ReductionSpec, tenant_salt: str | None = None) -> FeatureKey:
        return FeatureKey(image_digest(data), self.encoder.name, self.encoder.weights_digest, self._preprocess,
                          spec.to_dict(), tenant_salt, encoder_dtype=str(self.encoder.dtype).removeprefix("torch."))

    def features(self, source: str | bytes, visual_tokens: VisualTokens = None,
                 tenant_salt: str | None = None) -> VisionResult:
        """Raises `VisualTokensError` for a bad `visual_tokens` and an `ImageError` subclass for an image
        it refuses (both before anything is cached)."""
        spec = self.reduction_for(visual_tokens)
        if spec.method != "none" and not self.encoder.reducible_tokens:
            raise VisualTokensError(f"{self.encoder.name}'s visual tokens are fixed image tiles and cannot be "
                                    f"reduced; send no visual_tokens")
        with self._lock:
            self._requests += 1
        try:
            data = source_bytes(source, self.config.intake, self._fetch)
            key = self.key_for(data, spec, tenant_salt)
            tensors, found = self._cache.get_or_compute(key, lambda: self._compute(data, spec))
        except ImageError:
            with self._lock:
                self._image_errors += 1
            raise
        attended = tensors.get("attended_tokens")
        features = ImageFeatures(tensors["pooled"], tensors["tokens"], None if attended is None else int(attended))
        return VisionResult(features, key.digest(), found, key.image_digest, header_pixels(data))

    def _compute(self, data: bytes, spec: ReductionSpec) -> dict[str, torch.Tensor]:
        image = open_image(data, self.config.intake)
        features = self._batcher.encode(image)
        n = features.tokens.shape[0]
        grid = self._grid if self._grid is not None and self._grid[0] * self._grid[1] == n else None
        query = self._query if spec.method == "keep" else None
        tokens = reduce(features.tokens, spec, grid=grid, pooled=query)
        out = {"pooled": features.pooled.contiguous(), "tokens": tokens.contiguous()}
        if features.attended_tokens is not None:  # cached with the tokens: the decoder's masks need it
            out["attended_tokens"] = torch.tensor(features.attended_tokens, dtype=torch.int64)
        return out

    def clear_hot_cache(self) -> None:
        self._cache.clear_hot_tier()

    def stats(self) -> dict[str, int | float | bool]:
        """Cache counters per tier (hits, misses, evictions, bytes), encoder forwards, images and seconds,
        compute seconds (decode + encode + reduce), requests and refused images."""
        with self._lock:
            own = {"requests": self._requests, "image_errors": self._image_errors}
        return {**self._cache.stats(), **self._batcher.stats(), **own}

    def close(self) -> None:
        self._batcher.close()
        self._cache.close()

    def __enter__(self) -> VisionStage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
