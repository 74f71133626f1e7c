"""One frozen settings object, read once from environment variables and CLI flags, passed down.

Every limit the service enforces is here, with a default that is safe to put in front of users.
Environment variables are `MMSERVE_<FIELD>` in upper case (e.g. `MMSERVE_PORT=9000`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

from llm.engine import EngineConfig
from vision.intake import IntakeLimits

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"


@dataclass(frozen=True, slots=True)
class Settings:
    model: Path = BUNDLED_MODEL
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)
    max_body_bytes: int = 32 * 1024 * 1024  # a 20 MB image is ~27 MB as base64
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_images_per_request: int = 1  # CoCa models cross-attend to one image per conversation
    default_max_tokens: int = 32
    request_timeout_s: float = 60.0
    # The decode engine (llm/engine.py): KV pool and batching.
    kv_cache_bytes: int = 256 * 1024 * 1024  # self-attention KV pool, preallocated at start
    cross_cache_bytes: int = 256 * 1024 * 1024  # image K/V kept for reuse by later turns and requests
    kv_block_size: int = 16  # tokens per KV-cache block
    max_num_seqs: int = 64  # sequences decoded together in one step
    max_num_batched_tokens: int = 1024  # tokens per step, prefill chunks and decodes together
    kv_dtype: str = ""  # "" = the model's dtype; "bfloat16" halves the pool

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images_per_request",
                     "default_max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"setting {name} must be positive, got {getattr(self, name)}")
        if self.kv_dtype not in ("", "float32", "bfloat16", "float16"):
            raise ValueError(f"setting kv_dtype must be one of '', float32, bfloat16, float16; got {self.kv_dtype!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"setting port must be in 1..65535, got {self.port}")
        if self.threads < 0 or self.request_timeout_s <= 0:
            raise ValueError("settings threads must be >= 0 and request_timeout_s > 0")

    @property
    def engine_config(self) -> EngineConfig:
        return EngineConfig(block_size=self.kv_block_size, kv_cache_bytes=self.kv_cache_bytes,
                            cross_cache_bytes=self.cross_cache_bytes, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens, kv_dtype=self.kv_dtype or None)

    @property
    def intake_limits(self) -> IntakeLimits:
        return IntakeLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Defaults, then `MMSERVE_*` environment variables, then explicit overrides (CLI flags)."""
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            raw = env.get(f"MMSERVE_{f.name.upper()}")
            if raw is not None:
                kind = type(f.default)
                try:
                    values[f.name] = kind(raw)
                except ValueError:
                    raise ValueError(f"MMSERVE_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
