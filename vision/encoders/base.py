"""What every image encoder gives the vision stage, and what it declares about its tokens.

    features = encoder.encode(images)   # per image: a pooled latent and the tokens a decoder attends to

An encoder family states what the stage may do with its tokens (`reducible_tokens`, `token_grid`,
`saliency_query`) instead of the stage probing its modules; its `name`, `weights_digest` and
`preprocess_cfg` are what the feature cache keys name (cache/key.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

Grid = tuple[int, int]


@dataclass(frozen=True)
class ImageFeatures:
    pooled: torch.Tensor  # [embed_dim], not normalized
    tokens: torch.Tensor  # [n_tokens, width]
    # How many leading tokens text at and after the image attends to; None: all. Mllama's padding
    # tiles come last: only text BEFORE <|image|> sees them (vision/encoders/mllama.py).
    attended_tokens: int | None = None


class PreprocessConfig(Protocol):
    def to_dict(self) -> dict: ...


@runtime_checkable
class ImageEncoder(Protocol):
    name: str
    weights_digest: str  # names the weights in every feature-cache key
    dtype: torch.dtype  # what it computes in: features differ by dtype, so the feature-cache key names it too
    preprocess_cfg: PreprocessConfig
    # May the stage reduce the tokens (pool, merge, keep)? False when a decoder addresses them by
    # position (Mllama's tiles).
    reducible_tokens: bool
    token_grid: Grid | None  # the (h, w) patch grid of the tokens; None: no grid ("pool" cannot apply)
    saliency_query: torch.Tensor | None  # a query in the tokens' space for "keep"; None: rank by norm

    def encode(self, images: list[Image.Image]) -> list[ImageFeatures]: ...


@runtime_checkable
class CastableEncoder(Protocol):
    """An encoder that can run in another dtype (a served model's bfloat16 entry): `cast` returns a copy
    whose `name` names the dtype, so its features never share a cache key with the fp32 ones."""

    def cast(self, dtype: torch.dtype) -> ImageEncoder: ...


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the vision tower and projector tensors, in name
    order: the same weights give the same digest whatever the checkpoint's sharding."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
