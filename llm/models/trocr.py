"""The TrOCR decoder (a VisionEncoderDecoderModel's decoder in TrOCR checkpoints) with a KV cache, on
the engine's flat-token interface.

References: Li et al., "TrOCR: Transformer-based Optical Character Recognition with Pre-trained
Models" (2021); transformers `models/trocr/modeling_trocr.py` (5.24: TrOCRDecoder), whose weights this
module loads and whose logits it reproduces.

    token ids ─ embed_tokens * embed_scale + positions ─ [layernorm_embedding] ─ layers (post-LN):
        x = LN(x + self_attn(x)); x = LN(x + cross_attn(x, image)); x = LN(x + fc2(act(fc1(x))))
      ─ output_projection ─ logits

Positions: learned (a table offset by 2) or sinusoidal (fairseq's: position p of a token at index
padding_idx + 1 + p, and the zero row padding_idx for a pad token itself, as transformers computes
it from the token ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from llm.attention import StepBatch
from llm.models.one_image import ImageKV, OneImageDecoder, activation, built_from

LEARNED_OFFSET = 2


@dataclass(frozen=True, slots=True)
class TrOCRDecoderConfig:
    vocab_size: int
    width: int
    layers: int
    heads: int
    ffn: int
    context_length: int
    cross_width: int
    pad_token_id: int
    scale_embedding: bool = False
    learned_positions: bool = True
    layernorm_embedding: bool = True
    activation: str = "gelu"

    @classmethod
    def from_hf(cls, d: dict, encoder_width: int, max_context: int | None = None) -> "TrOCRDecoderConfig":
        context = int(d.get("max_position_embeddings", 512))
        activation(d.get("activation_function", "gelu"))
        return cls(vocab_size=int(d["vocab_size"]), width=int(d["d_model"]), layers=int(d["decoder_layers"]),
                   heads=int(d["decoder_attention_heads"]), ffn=int(d["decoder_ffn_dim"]),
                   context_length=min(context, max_context) if max_context else context,
                   cross_width=int(d.get("cross_attention_hidden_size") or encoder_width),
                   pad_token_id=int(d.get("pad_token_id", 1)), scale_embedding=bool(d.get("scale_embedding", False)),
                   learned_positions=bool(d.get("use_learned_position_embeddings", True)),
                   layernorm_embedding=bool(d.get("layernorm_embedding", True)),
                   activation=d.get("activation_function", "gelu"))


def sinusoidal_table(rows: int, width: int, padding_idx: int) -> torch.Tensor:
    """transformers' TrOCRSinusoidalPositionalEmbedding.get_embedding (tensor2tensor's layout)."""
    half = width // 2
    scale = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.int64).float() * -scale)
    angles = torch.arange(rows, dtype=torch.int64).float()[:, None] * freqs[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(rows, -1)
    if width % 2:
        table = torch.cat([table, torch.zeros(rows, 1)], dim=1)
    table[padding_idx] = 0
    return table


class Layer(nn.Module):
    def __init__(self, cfg: TrOCRDecoderConfig, index: int) -> None:
        super().__init__()
        w, self.heads, self.index = cfg.width, cfg.heads, index
        self.qkv_proj = nn.Linear(w, 3 * w)
        self.out_proj = nn.Linear(w, w)
        self.self_attn_layer_norm = nn.LayerNorm(w)
        self.cross_q_proj = nn.Linear(w, w)
        self.cross_out_proj = nn.Linear(w, w)
        self.encoder_attn_layer_norm = nn.LayerNorm(w)
        self.fc1 = nn.Linear(w, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, w)
        self.final_layer_norm = nn.LayerNorm(w)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        n, w = x.shape
        q, k, v = self.qkv_proj(x).view(n, 3, self.heads, w // self.heads).unbind(1)
        x = self.self_attn_layer_norm(x + self.out_proj(batch.self_attention(self.index, q, k, v).reshape(n, w)))
        q = self.cross_q_proj(x).view(n, self.heads, w // self.heads)
        x = self.encoder_attn_layer_norm(x + self.cross_out_proj(batch.cross_attention(self.index, q).reshape(n, w)))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class TrOCRDecoder(OneImageDecoder):
    def __init__(self, cfg: TrOCRDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers, self.heads, self.head_dim = cfg.layers, cfg.heads, cfg.width // cfg.heads
        self.context, self.vocab = cfg.context_length, cfg.vocab_size
        self.embed_scale = math.sqrt(cfg.width) if cfg.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        rows = cfg.context_length + (LEARNED_OFFSET if cfg.learned_positions else cfg.pad_token_id + 1)
        if cfg.learned_positions:
            self.embed_positions = nn.Embedding(rows, cfg.width)
        else:  # not in the checkpoint: computed, a buffer that follows the model's device and dtype
            self.register_buffer("sinusoids", sinusoidal_table(rows, cfg.width, cfg.pad_token_id), persistent=False)
        self.layernorm_embedding = nn.LayerNorm(cfg.width) if cfg.layernorm_embedding else None
        self.decoder_layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.layers))
        self.cross_blocks = nn.ModuleList(ImageKV(cfg.cross_width, cfg.heads, self.head_dim) for _ in range(cfg.layers))
        self.output_projection = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    def fill_buffers(self) -> None:
        if not self.cfg.learned_positions:
            rows = self.cfg.context_length + self.cfg.pad_token_id + 1
            self.sinusoids = sinusoidal_table(rows, self.cfg.width, self.cfg.pad_token_id)

    def positions(self, batch: StepBatch) -> torch.Tensor:
        if self.cfg.learned_positions:
            return self.embed_positions(batch.positions + LEARNED_OFFSET)
        pad = self.cfg.pad_token_id
        index = torch.where(batch.token_ids == pad, pad, batch.positions + pad + 1)
        return self.sinusoids[index]

    def forward(self, batch: StepBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.token_ids) * self.embed_scale + self.positions(batch)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        for layer in self.decoder_layers:
            x = layer(x, batch)
        return self.output_projection(x[batch.logits_rows])


def trocr_state_from_hf(cfg: TrOCRDecoderConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' TrOCRForCausalLM weights (no prefix) -> ours: q/k/v fused, cross k/v fused."""
    sd = {k.removeprefix("model.decoder."): v for k, v in hf.items()}
    ours = {"embed_tokens.weight": sd["embed_tokens.weight"],
            "output_projection.weight": sd.get("output_projection.weight", sd["embed_tokens.weight"])}
    if cfg.learned_positions:
        ours["embed_positions.weight"] = sd["embed_positions.weight"][: cfg.context_length + LEARNED_OFFSET]
    if cfg.layernorm_embedding:
        ours |= {f"layernorm_embedding.{p}": sd[f"layernorm_embedding.{p}"] for p in ("weight", "bias")}
    for i in range(cfg.layers):
        p, o = f"layers.{i}.", f"decoder_layers.{i}."
        for kind in ("weight", "bias"):
            ours[f"{o}qkv_proj.{kind}"] = torch.cat([sd[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            ours[f"{o}out_proj.{kind}"] = sd[f"{p}self_attn.out_proj.{kind}"]
            ours[f"{o}cross_q_proj.{kind}"] = sd[f"{p}encoder_attn.q_proj.{kind}"]
            ours[f"{o}cross_out_proj.{kind}"] = sd[f"{p}encoder_attn.out_proj.{kind}"]
            ours[f"cross_blocks.{i}.kv.{kind}"] = torch.cat([sd[f"{p}encoder_attn.{x}_proj.{kind}"] for x in "kv"])
            for name in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm", "fc1", "fc2"):
                ours[f"{o}{name}.{kind}"] = sd[f"{p}{name}.{kind}"]
    return ours


def trocr_decoder(config: dict, tensors: dict[str, torch.Tensor], encoder_width: int, max_context: int | None = None,
                  dtype: torch.dtype | None = None) -> TrOCRDecoder:
    """From a TrOCR config (dict) and its TrOCRForCausalLM tensors (names without the VED's `decoder.`)."""
    cfg = TrOCRDecoderConfig.from_hf(config, encoder_width, max_context)
    model = built_from(TrOCRDecoder, cfg, trocr_state_from_hf(cfg, tensors), dtype)
    return model
