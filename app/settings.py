"""One frozen settings object, read once from environment variables and CLI flags, passed down.

Every limit the service enforces is here, with a default that is safe to put in front of users.
Environment variables are `MMSERVE_<FIELD>` in upper case (e.g. `MMSERVE_PORT=9000`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from app.models.entry import ModelEntry, load_models_file, memory_shares, parse_model_flag
from llm.engine import EngineConfig
from llm.hardware import DTYPE_SETTINGS
from llm.kv_cache import KV_CACHE_DTYPES
from llm.quant.scheme import QuantScheme
from vision.fetch import FetchPolicy, parse_allowed_hosts
from vision.intake import IntakeLimits
from vision.stage import VisionStageConfig, parse_visual_tokens

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "demo"
DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "mmserve"  # the XDG data home; MMSERVE_DATA_DIR moves it


@dataclass(frozen=True, slots=True)
class Settings:
    # What to serve (app/models/entry.py): `models_file` (a models.toml), else `models` (NAME=DIR or DIR,
    # the CLI's repeatable --model; MMSERVE_MODELS comma-separated), else `model` (one directory).
    model: Path = BUNDLED_MODEL
    models: tuple[str, ...] = ()
    models_file: str = ""
    default_model: str = ""  # what a request that names no model gets; "" = the first served model
    max_model_len: int = 0  # caps a model's context (Llama 3.2's is 131072); 0 = what its KV pool holds
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int = 0  # torch intra-op threads; 0 = torch's default (all cores)
    max_body_bytes: int = 32 * 1024 * 1024  # a 20 MB image is ~27 MB as base64
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_images_per_request: int = 4  # per conversation, for every model (CoCa models take one)
    default_max_tokens: int = 32
    request_timeout_s: float = 60.0
    # The decode engine (llm/engine.py): KV pool and batching.
    kv_cache_bytes: int = 256 * 1024 * 1024  # self-attention KV pool, preallocated at start
    cross_cache_bytes: int = 256 * 1024 * 1024  # image K/V pool, preallocated at start; kept for later turns
    kv_block_size: int = 16  # tokens per KV-cache block
    max_num_seqs: int = 64  # sequences decoded together in one step
    max_num_batched_tokens: int = 1024  # tokens per step, prefill chunks and decodes together
    # Weights and activations of the decoders and vision towers: auto = bfloat16 where the CPU multiplies
    # bf16 natively (AVX512_BF16 / AMX / Arm BF16) and on CUDA, float32 otherwise (llm/hardware.py).
    dtype: str = "auto"
    # Both K/V pools (self-attention and image K/V): auto = the model's dtype; int8 = asymmetric int8 with
    # a scale and zero point per token and head (llm/kv_cache.py), ~1.9x the tokens of bf16 in the same bytes.
    kv_cache_dtype: str = "auto"
    # Quantize-on-load (llm/quant): "int8" (W8A16), "int4" / "int4-g32|64|128" (W4A16), round-to-nearest,
    # for every model whose entry sets none; the same weights `mmserve quantize` writes. "" = none.
    quantize: str = ""
    # torch.compile decode steps: ~20% faster single-stream decoding on a CPU, but each new step shape
    # compiles first (~30-60 s on 2 cores, in the engine thread), so it is off unless asked for.
    compile_decode: bool = False
    # The vision stage (vision/stage.py): remote images, encoder micro-batching, feature cache, token reduction.
    remote_image_hosts: str = ""  # comma-separated allow-list ("*.example.com" = its subdomains); "" = no remote URLs
    remote_image_timeout_s: float = 5.0  # one deadline for a remote image: DNS, connect, headers and body
    remote_image_max_redirects: int = 3  # each hop is checked again (allow-list, public addresses only)
    encoder_max_batch: int = 16  # images per vision-encoder forward
    encoder_max_wait_ms: float = 5.0  # how long a forward waits for more images after the first
    feature_cache_hot_bytes: int = 256 * 1024 * 1024  # in-process feature cache; 0 = none
    feature_cache_dir: str = ""  # persistent feature cache, shared by a host's workers; "" = no disk tier
    feature_cache_disk_bytes: int = 1024 * 1024 * 1024
    visual_tokens: str = ""  # a request's default: "" = all of the model's tokens, "16" = 16, "0.25" = a quarter
    visual_token_reduction: str = "keep"  # how tokens are reduced: pool (grid towers), tome or keep (best in bench.vision)
    # Service guards (app/auth.py, app/admission.py), embeddings, and the SIGTERM drain (app/lifecycle.py).
    api_keys: str = field(default="", repr=False)  # comma-separated; none here or in the file: /v1/* is open
    api_key_file: str = ""  # one key per line, '#' starts a comment
    rate_limit_rpm: float = 600.0  # per key: token-bucket refill in requests per minute; 0 = no limit
    rate_limit_burst: int = 60  # per key: requests allowed back to back
    quota_tokens_per_day: int = 0  # per key, per UTC day; 0 = unlimited
    max_concurrent_requests: int = 64  # model requests being processed at once
    max_queued_requests: int = 256  # model requests waiting for a slot; past both, 429 at once
    overload_retry_after_s: int = 1  # Retry-After on an overload 429
    drain_timeout_s: float = 30.0  # after SIGTERM, the most time requests in flight get to finish
    max_embedding_inputs: int = 64  # inputs per /v1/embeddings request
    max_classify_labels: int = 256  # labels per /v1/classify request
    # The staged router (app/routing/staged.py): stage-1 answers, policy refusals, and which model decodes.
    router_enabled: bool = True  # off: no stage-1 answers, every request to router_small_model (policy still holds)
    router_zero_shot_threshold: float = 0.9  # top zero-shot probability stage 1 needs to answer
    router_min_intent_margin: float = 0.02  # cosine lead of "identification" over the next intent
    router_policy_labels: str = ""  # comma-separated zero-shot labels that refuse the request
    router_policy_threshold: float = 0.5  # probability at which a policy label fires
    router_policy_message: str = "I can't help with this image: it shows something this service does not discuss."
    router_alias: str = "auto"  # the model name a request sends to be routed by the rules below; "" = none
    router_zero_shot_model: str = ""  # whose contrastive towers stage 1 and policy use; "" = the first that has them
    router_small_model: str = ""  # "" = the first loaded model
    router_large_model: str = ""  # "" = the first loaded model
    router_large_intents: str = "description,other,out_of_domain"  # comma-separated, go to the large model
    router_large_prompt_words: int = 32  # prompts this long or longer go to the large model
    router_intent_cache_size: int = 4096  # prompts whose intent is remembered (LRU); 0 = embed every prompt
    # Batch jobs (app/batches/): files, batches and per-line results in SQLite.
    data_dir: Path = DEFAULT_DATA_DIR
    batch_db: str = ""  # "" = data_dir / "batches.sqlite3"
    max_file_bytes: int = 64 * 1024 * 1024  # one uploaded batch input file (POST /v1/files)
    max_batch_requests: int = 50_000  # lines per batch input file (OpenAI's limit)
    batch_concurrency: int = 4  # batch lines in flight at once; the engine's other slots stay for chat
    # Canary versions (app/canary/): two versions of one model name, a sticky weighted split or a shadow copy,
    # and automatic rollback when the canary does worse than the stable version over a sliding window.
    canary: tuple[str, ...] = ()  # NAME@VERSION=WEIGHT or NAME@VERSION=shadow:WEIGHT (the CLI's --canary)
    canary_stickiness: str = "conversation"  # "conversation": key + first user message; "key": the key alone
    canary_auto_rollback: bool = True
    canary_window_s: float = 120.0  # the sliding window both versions' outcomes are compared over
    canary_window_max_samples: int = 2000  # per version; the oldest go first
    canary_min_samples: int = 20  # canary requests in the window before any verdict
    canary_max_error_rate_delta: float = 0.05  # roll back when canary errors > stable's + this (absolute)
    canary_max_p95_ratio: float = 1.5  # roll back when canary p95 > stable's p95 x this + the slack
    canary_p95_slack_s: float = 0.05  # absolute slack on the p95 comparison (tiny latencies are noise)
    canary_shadow_max_in_flight: int = 4  # shadow copies running at once; past it, a copy is skipped
    # Degradation under overload (app/degrade.py), before refusal: a request that finds this many model
    # requests waiting ahead of it is served with fewer visual tokens, then by the small model; 0 = step off.
    degrade_visual_tokens_waiting: int = 64
    degrade_visual_tokens: str = "0.25"  # what a degraded request's images get (a count or a ratio)
    degrade_small_model_waiting: int = 128  # needs router_small_model (the step is skipped without one)
    # Tenancy (app/tenancy/): the key store, persisted quotas and the audit log. Paths are settings so that
    # every worker (and every Ray replica) on a host can point at the same files.
    keys_db: str = ""  # "" = data_dir / "keys.sqlite3"
    usage_db: str = ""  # "" = data_dir / "usage.sqlite3"
    # Default quotas of every key (a store key may set its own); 0 = unlimited. quota_tokens_per_day above too.
    quota_requests_per_minute: int = 0
    quota_tokens_per_minute: int = 0
    quota_images_per_minute: int = 0
    quota_pixels_per_minute: int = 0
    quota_requests_per_day: int = 0
    quota_images_per_day: int = 0
    quota_pixels_per_day: int = 0
    audit_log: str = ""  # "" = data_dir / "audit" / "audit.jsonl"; "off" = no audit log
    audit_max_bytes: int = 64 * 1024 * 1024  # rotate past this size (FILE.000001, .000002, ...)
    audit_content: bool = False  # also record prompt text and image data: URLs (off: digests and counts only)
    audit_fsync: bool = False  # fsync each record (survives a power cut, not only a killed process; slower)
    # Workers sharing the store (replicas): a batch is leased to one; a dead one's batch is taken over at expiry.
    batch_lease_s: float = 30.0  # renewed every third of it while the batch runs
    batch_poll_s: float = 2.0  # how often an idle worker looks for batches made or left by other workers

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "models", tuple(self.models))
        if self.max_model_len < 0:
            raise ValueError(f"setting max_model_len must be >= 0, got {self.max_model_len}")
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        for name in ("max_file_bytes", "max_batch_requests", "batch_concurrency", "audit_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_lease_s", "batch_poll_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"setting {name} must be > 0, got {getattr(self, name)}")
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images_per_request",
                     "default_max_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"setting {name} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPE_SETTINGS:
            raise ValueError(f"setting dtype must be one of {', '.join(DTYPE_SETTINGS)}; got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"setting kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                             f"got {self.kv_cache_dtype!r}")
        if self.quantize:
            try:
                QuantScheme.parse(self.quantize)
            except ValueError as e:
                raise ValueError(f"setting quantize: {e}") from None
        if not 0 < self.port < 65536:
            raise ValueError(f"setting port must be in 1..65535, got {self.port}")
        if self.threads < 0 or self.request_timeout_s <= 0:
            raise ValueError("settings threads must be >= 0 and request_timeout_s > 0")
        for name in ("quota_requests_per_minute", "quota_tokens_per_minute", "quota_images_per_minute",
                     "quota_pixels_per_minute", "quota_requests_per_day", "quota_images_per_day",
                     "quota_pixels_per_day"):
            if getattr(self, name) < 0:
                raise ValueError(f"setting {name} must be >= 0, got {getattr(self, name)}")
        for name, least in (("max_concurrent_requests", 1), ("max_queued_requests", 0), ("rate_limit_rpm", 0),
                            ("rate_limit_burst", 1), ("quota_tokens_per_day", 0), ("overload_retry_after_s", 1),
                            ("drain_timeout_s", 0), ("max_embedding_inputs", 1), ("max_classify_labels", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"setting {name} must be >= {least}, got {getattr(self, name)}")
        for name in ("router_zero_shot_threshold", "router_policy_threshold", "router_min_intent_margin"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"setting {name} must be in [0, 1], got {getattr(self, name)}")
        if self.router_large_prompt_words < 1 or self.router_intent_cache_size < 0:
            raise ValueError("settings router_large_prompt_words must be >= 1 and router_intent_cache_size >= 0, "
                             f"got {self.router_large_prompt_words} and {self.router_intent_cache_size}")
        for name, least in (("encoder_max_batch", 1), ("encoder_max_wait_ms", 0), ("remote_image_max_redirects", 0),
                            ("feature_cache_hot_bytes", 0), ("feature_cache_disk_bytes", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"setting {name} must be >= {least}, got {getattr(self, name)}")
        if self.remote_image_timeout_s <= 0:
            raise ValueError(f"setting remote_image_timeout_s must be > 0, got {self.remote_image_timeout_s}")
        self._check_canary_and_degradation()
        try:  # the host list, the default visual_tokens and the reduction method, checked at start
            self.vision_stage_config  # noqa: B018
        except ValueError as error:
            raise ValueError(f"vision settings (remote_image_hosts, visual_tokens, visual_token_reduction): "
                             f"{error}") from None

    def _check_canary_and_degradation(self) -> None:
        object.__setattr__(self, "canary", tuple(self.canary))
        if self.canary_stickiness not in ("conversation", "key"):
            raise ValueError(f"setting canary_stickiness must be conversation or key, got {self.canary_stickiness!r}")
        for name, least in (("canary_window_s", 1e-3), ("canary_window_max_samples", 1), ("canary_min_samples", 1),
                            ("canary_max_error_rate_delta", 0), ("canary_max_p95_ratio", 1), ("canary_p95_slack_s", 0),
                            ("canary_shadow_max_in_flight", 1), ("degrade_visual_tokens_waiting", 0),
                            ("degrade_small_model_waiting", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"setting {name} must be >= {least}, got {getattr(self, name)}")
        first, then = self.degrade_visual_tokens_waiting, self.degrade_small_model_waiting
        if first and then and first > then:
            raise ValueError(f"degradation goes fewer visual tokens first, then the small model: setting "
                             f"degrade_visual_tokens_waiting ({first}) must be <= degrade_small_model_waiting ({then})")
        if first and parse_visual_tokens(self.degrade_visual_tokens) is None:
            raise ValueError("setting degrade_visual_tokens must name fewer tokens (a count or a ratio), got ''")

    @property
    def engine_config(self) -> EngineConfig:
        return EngineConfig(block_size=self.kv_block_size, kv_cache_bytes=self.kv_cache_bytes,
                            cross_cache_bytes=self.cross_cache_bytes, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens, kv_cache_dtype=self.kv_cache_dtype,
                            compile_decode=self.compile_decode)

    def model_entries(self) -> list[ModelEntry]:
        """What to serve, validated (names, dtypes, shares); nothing is loaded yet."""
        if self.models_file:
            entries = load_models_file(self.models_file)
        elif self.models:
            entries = [parse_model_flag(m) for m in self.models]
        else:
            entries = [ModelEntry("", self.model)]
        memory_shares(entries)  # raises when the shares add up to more than all
        return entries

    @property
    def batch_db_path(self) -> Path:
        return Path(self.batch_db) if self.batch_db else self.data_dir / "batches.sqlite3"

    @property
    def keys_db_path(self) -> Path:
        return Path(self.keys_db) if self.keys_db else self.data_dir / "keys.sqlite3"

    @property
    def usage_db_path(self) -> Path:
        return Path(self.usage_db) if self.usage_db else self.data_dir / "usage.sqlite3"

    @property
    def audit_log_path(self) -> Path | None:
        """None: the audit log is off (setting audit_log="off")."""
        if self.audit_log == "off":
            return None
        return Path(self.audit_log) if self.audit_log else self.data_dir / "audit" / "audit.jsonl"

    @property
    def intake_limits(self) -> IntakeLimits:
        return IntakeLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    @property
    def vision_stage_config(self) -> VisionStageConfig:
        fetch = FetchPolicy(parse_allowed_hosts(self.remote_image_hosts), self.remote_image_timeout_s,
                            self.max_image_bytes, self.remote_image_max_redirects)
        return VisionStageConfig(self.intake_limits, fetch, self.encoder_max_batch, self.encoder_max_wait_ms,
                                 self.threads, self.feature_cache_hot_bytes, self.feature_cache_dir or None,
                                 self.feature_cache_disk_bytes, parse_visual_tokens(self.visual_tokens),
                                 self.visual_token_reduction)

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
                    values[f.name] = (_parse_bool(raw) if kind is bool else
                                      tuple(v.strip() for v in raw.split(",") if v.strip()) if kind is tuple else
                                      kind(raw))
                except ValueError:
                    raise ValueError(f"MMSERVE_{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse_bool(raw: str) -> bool:
    """bool("0") is True, so flags are read by name."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
