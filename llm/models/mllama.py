"""The Llama-3.2-Vision ("mllama") text decoder with a KV cache, on the engine's flat-token interface.

References: Meta, "Llama 3.2 Vision" model card and llama-models `llama3/model.py`; transformers
`models/mllama/modeling_mllama.py` (5.24: MllamaTextModel, MllamaCrossAttentionDecoderLayer), whose
weights this module loads and whose logits it reproduces.

    token ids ─ embedding ─┬─ self-attention layer: RMSNorm, RoPE + GQA attention, RMSNorm, SwiGLU
                           ├─ cross-attention layer (at config.cross_attention_layers):
                           │     RMSNorm, q_norm(q) against the image K/V, tanh(gate) * attention,
                           │     RMSNorm, SwiGLU, tanh(gate) * MLP
                           └─ ... ─ RMSNorm ─ lm_head ─ logits

Image K/V (k_proj then k_norm, v_proj of the projected vision tokens) depend on the image alone:
`cross_kv()` computes them once and every step reuses them.

Rows before the first <|image|> token (`batch.image_visible` False) follow transformers 5.24, the
oracle: `_prepare_cross_attention_mask` turns such a row's all-masked cross-attention row into an
all-zero one (`cross_attention_mask *= full_text_row_masked_out_mask`), so the row attends to EVERY
image token and the gated attention output is added; only the MLP output is zeroed. (Meta's reference
zeroes the attention output too: transformers issue #39379.)
"Every image token" includes the padding tiles of an image with fewer than max_num_tiles tiles, so
an image's tokens cover all tiles, real ones first, and rows at or after <|image|> attend to the real
ones only (`ImageInput.attended_tokens`; the model runner builds the per-row masks).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llm.attention import KVShape, StepBatch, head_major
from llm.loading.hf import load_tensors, read_config
from llm.cross_plan import CrossPlan, ImageSpan, image_token_plan

EXTRA_EMBEDDINGS = 8  # transformers' MllamaTextModel embeds vocab_size + 8 ids; <|image|> is one of them


@dataclass(frozen=True, slots=True)
class MllamaDecoderConfig:
    vocab_size: int  # rows of lm_head; the embedding has vocab_size + 8
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    cross_attention_layers: tuple[int, ...]
    context_length: int
    image_token_id: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_type: str = "default"  # "default" | "llama3"
    rope_factor: float = 8.0  # llama3 scaling (used only when rope_type == "llama3")
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    tie_word_embeddings: bool = False
    # Structured pruning (llm/quant/prune.py) keeps fewer heads of the same size: 0 = hidden_size // num_heads.
    head_width: int = 0

    def __post_init__(self) -> None:
        if (not self.head_width and self.hidden_size % self.num_heads) or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide into num_heads heads, and those into num_kv_heads groups")
        if any(not 0 <= i < self.num_layers for i in self.cross_attention_layers):
            raise ValueError(f"cross_attention_layers {self.cross_attention_layers} outside 0..{self.num_layers - 1}")
        if self.rope_type not in ("default", "llama3"):
            raise ValueError(f"RoPE type {self.rope_type!r} is not supported (default, llama3)")

    @property
    def head_dim(self) -> int:
        return self.head_width or self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: dict, max_context: int | None = None) -> "MllamaDecoderConfig":
        """From an HF MllamaConfig as a dict (config.json). `max_context` caps max_position_embeddings
        (131072 for Llama-3.2-Vision), which sizes the KV pool and the scheduler's limits."""
        text = config["text_config"]
        if text.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {text['hidden_act']!r} is not supported (silu)")
        # transformers 5 writes rope_parameters; older config.json files rope_theta + rope_scaling
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        context = int(text.get("max_position_embeddings", 131_072))
        return cls(
            vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
            num_layers=int(text["num_hidden_layers"]), num_heads=int(text["num_attention_heads"]),
            num_kv_heads=int(text["num_key_value_heads"]), intermediate_size=int(text["intermediate_size"]),
            cross_attention_layers=tuple(int(i) for i in text["cross_attention_layers"]),
            context_length=min(context, max_context) if max_context else context,
            image_token_id=int(config.get("image_token_index", config.get("image_token_id", 128256))),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 500_000.0))), rope_type=rope_type,
            rope_factor=float(rope.get("factor", 8.0)), rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_context=int(rope.get("original_max_position_embeddings", context)),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)))


@functools.lru_cache(maxsize=8)
def rope_inv_freq(cfg: MllamaDecoderConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], computed as transformers' rope init functions do, in fp32.
    Cached: a dozen tiny ops that would otherwise run every step (callers must not modify it)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if cfg.rope_type == "default":
        return inv_freq
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp in between
    factor, low, high, old = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                              cfg.rope_original_context)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel, bitwise the same as below in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()  # transformers' order of roundings for half-precision activations
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, cfg: MllamaDecoderConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SelfAttention(nn.Module):
    """RoPE + GQA; K/V go to the paged pool (q, k, v fused into one matmul)."""

    def __init__(self, cfg: MllamaDecoderConfig, index: int) -> None:
        super().__init__()
        self.index, self.heads, self.kv_heads, self.head_dim = index, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: StepBatch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        qk, v = self.qkv_proj(x).view(n, -1, self.head_dim).split([self.heads + self.kv_heads, self.kv_heads], dim=1)
        qk = qk * cos + rotate_half(qk) * sin  # q's and k's heads rotated together: half the ops
        q, k = qk.split([self.heads, self.kv_heads], dim=1)
        out = batch.self_attention(self.index, q, k, v)
        return self.o_proj(out.reshape(n, -1))


class CrossAttention(nn.Module):
    """Queries from the text, keys and values from the image; q_norm and k_norm per head."""

    def __init__(self, cfg: MllamaDecoderConfig, index: int) -> None:
        super().__init__()
        self.index, self.heads, self.kv_heads, self.head_dim = index, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def image_kv(self, image_tokens: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, hidden] projected vision tokens -> K, V [B, kv_heads, N, head_dim], each contiguous
        (`head_major`; written into `out` when given); k_norm normalises each head's key."""
        def keys(x: torch.Tensor) -> torch.Tensor:
            return self.k_norm(self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)))

        (k,) = head_major(keys, image_tokens, self.kv_heads, self.head_dim, out=None if out is None else out[:1])
        (v,) = head_major(self.v_proj, image_tokens, self.kv_heads, self.head_dim, out=None if out is None else out[1:])
        return k, v

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(n, self.heads, self.head_dim))
        return self.o_proj(batch.cross_attention(self.index, q).reshape(n, -1))


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: MllamaDecoderConfig, self_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, self_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, batch: StepBatch, cos: torch.Tensor, sin: torch.Tensor,
                visible: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class CrossAttentionLayer(nn.Module):
    """tanh-gated cross-attention and MLP. Rows that see no image (visible False) keep the gated
    attention (transformers' behaviour, see the module docstring) and skip the MLP."""

    def __init__(self, cfg: MllamaDecoderConfig, cross_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg, cross_index)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, batch: StepBatch, cos: torch.Tensor, sin: torch.Tensor,
                visible: torch.Tensor | None) -> torch.Tensor:
        x = x + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(x), batch)
        h = self.mlp(self.post_attention_layernorm(x))
        if visible is not None:
            h = visible * h
        return x + self.cross_attn_mlp_gate.tanh() * h


class MllamaDecoder(nn.Module):
    def __init__(self, cfg: MllamaDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size + EXTRA_EMBEDDINGS, cfg.hidden_size)
        layers, n_self, n_cross = [], 0, 0
        for i in range(cfg.num_layers):
            if i in cfg.cross_attention_layers:
                layers.append(CrossAttentionLayer(cfg, n_cross))
                n_cross += 1
            else:
                layers.append(SelfAttentionLayer(cfg, n_self))
                n_self += 1
        self.layers = nn.ModuleList(layers)
        self.cross_layers = [layer for layer in layers if isinstance(layer, CrossAttentionLayer)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    # -- what the model runner needs to know --------------------------------------------------------
    @property
    def kv_shape(self) -> KVShape:
        return KVShape(layers=self.cfg.num_layers - len(self.cross_layers), kv_heads=self.cfg.num_kv_heads,
                       head_dim=self.cfg.head_dim)

    @property
    def cross_kv_shape(self) -> KVShape:
        return KVShape(layers=len(self.cross_layers), kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim)

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def cross_plan(self, prompt_ids: list[int], images: list[ImageSpan]) -> CrossPlan:
        """Each image is seen from its <|image|> token on (its real tiles), text before the first one
        sees every image token (module docstring); no image token: no position is at or after an
        image, as transformers' processor has it."""
        return image_token_plan(prompt_ids, self.cfg.image_token_id, images, never=self.cfg.context_length)

    def cross_kv(self, image_tokens: torch.Tensor, out: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Images [B, N, hidden] -> K/V [B, kv_heads, N, head_dim] for every cross-attention layer
        (`cross_kv_shape`), written into `out` when given (the runner's preallocated pool): computed
        once per image (and for all of a step's new images of one size in one matmul)."""
        image_tokens = image_tokens.to(self.embed_tokens.weight.dtype)
        return [layer.cross_attn.image_kv(image_tokens, None if out is None else out[i])
                for i, layer in enumerate(self.cross_layers)]

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """The step's flat tokens -> logits [len(batch.logits_rows), vocab]; K/V go to the pool."""
        x = self.embed_tokens(batch.token_ids)
        # RoPE angles in fp32 whatever the weights' dtype, as transformers (a dozen tiny ops per step)
        freqs = batch.positions[:, None].float() * rope_inv_freq(self.cfg, x.device)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, head_dim]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        visible = None if batch.image_visible is None else batch.image_visible[:, None].to(x.dtype)
        for layer in self.layers:
            x = layer(x, batch, cos, sin, visible)
        return self.lm_head(self.norm(x[batch.logits_rows]))


# -- loading transformers' weights ------------------------------------------------------------------

HF_PREFIXES = ("language_model.model.", "model.language_model.")  # how 5.24 saves / its in-memory layout
HF_LM_HEAD = ("language_model.lm_head.weight", "lm_head.weight")


def decoder_state_from_hf(cfg: MllamaDecoderConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' MllamaForConditionalGeneration weights (any of its prefixes) -> ours: q/k/v fused
    in the self-attention layers, gate/up in every MLP, everything else by name."""
    sd = {}
    for name, tensor in hf.items():
        for prefix in HF_PREFIXES:
            if name.startswith(prefix):
                sd[name[len(prefix):]] = tensor
    lm_head = next((hf[k] for k in HF_LM_HEAD if k in hf), None)
    if lm_head is None and cfg.tie_word_embeddings:
        lm_head = sd["embed_tokens.weight"][: cfg.vocab_size]
    if lm_head is None:
        raise KeyError("no lm_head weight (language_model.lm_head.weight) in the checkpoint")
    ours = {"embed_tokens.weight": sd.pop("embed_tokens.weight"), "norm.weight": sd.pop("norm.weight"),
            "lm_head.weight": lm_head}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        mlp = [sd.pop(p + f"mlp.{w}_proj.weight") for w in ("gate", "up")]
        ours[p + "mlp.gate_up_proj.weight"] = torch.cat(mlp)
        if i not in cfg.cross_attention_layers:
            qkv = [sd.pop(p + f"self_attn.{w}_proj.weight") for w in "qkv"]
            ours[p + "self_attn.qkv_proj.weight"] = torch.cat(qkv)
        for name in [k for k in sd if k.startswith(p)]:
            ours[name] = sd.pop(name)
    if sd:
        raise KeyError(f"unexpected language-model weights: {sorted(sd)[:5]}")
    return ours


def _decoder(cfg: MllamaDecoderConfig, hf: dict[str, torch.Tensor], dtype: torch.dtype | None) -> MllamaDecoder:
    """Built on the meta device and given the checkpoint's tensors (no random init, no second copy)."""
    with torch.device("meta"):
        decoder = MllamaDecoder(cfg)
    state = {k: v.contiguous() for k, v in decoder_state_from_hf(cfg, hf).items()}
    decoder.load_state_dict(state, strict=True, assign=True)
    return decoder.to(dtype).eval() if dtype is not None else decoder.eval()


def mllama_decoder_from_hf_model(model: nn.Module, max_context: int | None = None,
                                 dtype: torch.dtype | None = None) -> MllamaDecoder:
    """Our decoder from an in-memory transformers MllamaForConditionalGeneration (tests, benchmarks)."""
    cfg = MllamaDecoderConfig.from_hf(model.config.to_dict(), max_context)
    return _decoder(cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}, dtype)


def mllama_from_hf_dir(path: str | Path, max_context: int | None = None,
                       dtype: torch.dtype | None = None) -> MllamaDecoder:
    """Our decoder from a local HF Mllama checkpoint directory (config.json + *.safetensors, sharded or
    not). Reads only the language model's tensors; nothing reaches a hub."""
    cfg = MllamaDecoderConfig.from_hf(read_config(path), max_context)
    return _decoder(cfg, load_tensors(path, HF_PREFIXES + HF_LM_HEAD), dtype)
