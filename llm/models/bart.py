"""The BART / mBART decoder with a KV cache, on the engine's flat-token interface, and the BART
encoder stack a family may put in front of its cross-attention (Florence-2).

References: Lewis et al., "BART: Denoising Sequence-to-Sequence Pre-training" (2019); Liu et al.,
"Multilingual Denoising Pre-training for Neural Machine Translation" (mBART, 2020); transformers
`models/bart/modeling_bart.py` and `models/mbart/modeling_mbart.py` (5.24), whose weights this
module loads and whose logits it reproduces.

    token ids ─ embed * scale + learned position (offset 2) ─ LN ─┬─ self-attention (causal, paged)
                                                                   ├─ cross-attention to the memory
                                                                   ├─ fc1 ─ act ─ fc2
                                                                   └─ ... ─ (mBART: LN) ─ lm_head (+ bias)

BART's layers are post-norm (sublayer, add, LayerNorm); mBART's pre-norm (LayerNorm, sublayer, add)
with one more LayerNorm after the last layer. `pre_norm` picks one; everything else is shared.

What the decoder cross-attends to ("memory") depends on the request's inputs alone, so `cross_kv()`
computes each layer's K/V once and the engine pools them by digest. The memory is either given
(VisionEncoderDecoder: the image encoder's tokens, through `enc_to_dec_proj` when widths differ) or
computed there by an attached `BartEncoder` from its input embeddings (Florence-2: image tokens and
prompt embeddings; so the encoder, too, runs once per (image, prompt) and only on a pool miss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm.attention import KVShape, StepBatch, head_major
from llm.cross_plan import CrossPlan, ImageSpan

POSITION_OFFSET = 2  # BART/mBART learned positions are looked up at position + 2 (a fairseq legacy)
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu,
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True, slots=True)
class BartConfig:
    """One side (encoder or decoder) of a BART/mBART config, as the layers need it."""

    vocab_size: int
    d_model: int
    layers: int
    heads: int
    ffn_dim: int
    max_positions: int
    activation: str = "gelu"
    scale_embedding: bool = False
    pre_norm: bool = False  # mBART: pre-LN layers and a final LayerNorm
    memory_width: int | None = None  # the memory's width when it differs (VisionEncoderDecoder's enc_to_dec_proj)
    logits_bias: bool = False  # BartForConditionalGeneration's final_logits_bias

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} does not divide into {self.heads} heads")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported ({', '.join(ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0

    @classmethod
    def from_hf(cls, config: dict, side: str = "decoder", **extra) -> "BartConfig":
        """From a transformers BartConfig / MBartConfig as a dict; `side` "decoder" or "encoder"."""
        model_type = config.get("model_type", "bart")
        if model_type not in ("bart", "mbart"):
            raise ValueError(f"model_type {model_type!r} is not a BART decoder (bart, mbart)")
        return cls(vocab_size=config["vocab_size"], d_model=config["d_model"], layers=config[f"{side}_layers"],
                   heads=config[f"{side}_attention_heads"], ffn_dim=config[f"{side}_ffn_dim"],
                   max_positions=config["max_position_embeddings"],
                   activation=config.get("activation_function", "gelu"),
                   scale_embedding=bool(config.get("scale_embedding", False)), pre_norm=model_type == "mbart", **extra)


class FeedForward(nn.Module):
    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.d_model, cfg.ffn_dim), nn.Linear(cfg.ffn_dim, cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _sublayer(x: torch.Tensor, norm: nn.LayerNorm, pre_norm: bool, f) -> torch.Tensor:
    """Post-norm (BART): norm(x + f(x)); pre-norm (mBART): x + f(norm(x))."""
    return x + f(norm(x)) if pre_norm else norm(x + f(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BartConfig, index: int) -> None:
        super().__init__()
        self.index, self.heads, self.pre_norm = index, cfg.heads, cfg.pre_norm
        w = cfg.d_model
        self.qkv_proj, self.out_proj = nn.Linear(w, 3 * w), nn.Linear(w, w)
        self.self_attn_layer_norm = nn.LayerNorm(w)
        self.cross_q_proj, self.cross_kv_proj, self.cross_out_proj = nn.Linear(w, w), nn.Linear(w, 2 * w), nn.Linear(w, w)
        self.encoder_attn_layer_norm = nn.LayerNorm(w)
        self.mlp = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(w)

    def memory_kv(self, memory: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = head_major(self.cross_kv_proj, memory, self.heads, memory.shape[-1] // self.heads, parts=2, out=out)
        return k, v

    def _self(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        n, w = x.shape
        q, k, v = self.qkv_proj(x).view(n, 3, self.heads, w // self.heads).unbind(1)
        return self.out_proj(batch.self_attention(self.index, q, k, v).reshape(n, w))

    def _cross(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        n, w = x.shape
        q = self.cross_q_proj(x).view(n, self.heads, w // self.heads)
        return self.cross_out_proj(batch.cross_attention(self.index, q).reshape(n, w))

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        x = _sublayer(x, self.self_attn_layer_norm, self.pre_norm, lambda h: self._self(h, batch))
        x = _sublayer(x, self.encoder_attn_layer_norm, self.pre_norm, lambda h: self._cross(h, batch))
        return _sublayer(x, self.final_layer_norm, self.pre_norm, self.mlp)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        self.heads, self.pre_norm = cfg.heads, cfg.pre_norm
        w = cfg.d_model
        self.qkv_proj, self.out_proj = nn.Linear(w, 3 * w), nn.Linear(w, w)
        self.self_attn_layer_norm = nn.LayerNorm(w)
        self.mlp = FeedForward(cfg)
        self.final_layer_norm = nn.LayerNorm(w)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _sublayer(x, self.self_attn_layer_norm, self.pre_norm, self._attend)
        return _sublayer(x, self.final_layer_norm, self.pre_norm, self.mlp)


class BartEncoder(nn.Module):
    """BART's encoder over input embeddings [B, N, W] (already scaled token embeddings, or other
    vectors in their place: Florence-2's image tokens), every position seeing every other."""

    def __init__(self, cfg: BartConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_positions = nn.Embedding(cfg.max_positions + POSITION_OFFSET, cfg.d_model)
        self.layernorm_embedding = nn.LayerNorm(cfg.d_model)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.layer_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else None

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[1]
        if n > self.cfg.max_positions:
            raise ValueError(f"the encoder input has {n} positions; the model has {self.cfg.max_positions}")
        x = self.layernorm_embedding(embeds + self.embed_positions.weight[POSITION_OFFSET:POSITION_OFFSET + n])
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x) if self.layer_norm is not None else x


class BartDecoder(nn.Module):
    def __init__(self, cfg: BartConfig, encoder: BartConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.d_model
        self.encoder = BartEncoder(encoder) if encoder is not None else None
        self.enc_to_dec_proj = (nn.Linear(cfg.memory_width, w)
                                if cfg.memory_width is not None and cfg.memory_width != w else None)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, w)
        self.embed_positions = nn.Embedding(cfg.max_positions + POSITION_OFFSET, w)
        self.layernorm_embedding = nn.LayerNorm(w)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.layers))
        self.layer_norm = nn.LayerNorm(w) if cfg.pre_norm else None
        self.lm_head = nn.Linear(w, cfg.vocab_size, bias=cfg.logits_bias)

    # -- what the model runner needs to know --------------------------------------------------------
    @property
    def kv_shape(self) -> KVShape:
        return KVShape(layers=self.cfg.layers, kv_heads=self.cfg.heads, head_dim=self.cfg.head_dim)

    @property
    def cross_kv_shape(self) -> KVShape:
        return self.kv_shape

    @property
    def context_length(self) -> int:
        return self.cfg.max_positions

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def cross_plan(self, prompt_ids: list[int], images: list[ImageSpan]) -> CrossPlan:
        """Every position sees all of the request's one memory."""
        if len(images) != 1:
            raise ValueError(f"a BART decoder cross-attends to exactly one encoder output, got {len(images)}")
        return CrossPlan.everything(images[0].length)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as BART's encoder takes them (scaled)."""
        return self.embed_tokens(ids) * self.cfg.embed_scale

    def cross_kv(self, memory: torch.Tensor, out: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[B, N, W] -> per layer K, V [B, heads, N, head_dim] (written into `out` when given). With
        an encoder attached the input is the encoder's input embeddings, and it runs here first."""
        memory = memory.to(self.embed_tokens.weight.dtype)
        if self.encoder is not None:
            memory = self.encoder(memory)
        if self.enc_to_dec_proj is not None:
            memory = self.enc_to_dec_proj(memory)
        return [layer.memory_kv(memory, None if out is None else out[i]) for i, layer in enumerate(self.layers)]

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """The step's flat tokens -> logits [len(batch.logits_rows), vocab]; K/V go to the pool."""
        x = self.embed(batch.token_ids) + self.embed_positions(batch.positions + POSITION_OFFSET)
        x = self.layernorm_embedding(x)
        for layer in self.layers:
            x = layer(x, batch)
        x = x[batch.logits_rows]
        return self.lm_head(self.layer_norm(x) if self.layer_norm is not None else x)
